"""Each layer's input-patch moments, and each compressed layer's least-squares statistics.

One mechanism accumulates a conv's input-patch products: :class:`PatchMoments` (the full
Gram matrix, by :class:`GramAccumulator`, or its per-channel diagonal blocks), fed batch
after batch with the conv's inputs. :func:`collect_patch_moments` feeds it the inputs a
network gives its convs in one pass (the ``data`` weighting's blocks, the latency
planner's full moments); :class:`LayerInputs` feeds the refit the inputs the converted
network gives one layer at a time (:func:`layer_statistics`).

The refit needs, per layer, the Gram matrix ``S = sum patch patch^T`` of the input
patches the converted network feeds it (earlier layers already refitted). Two costs
dominate, and this module keeps both down without changing a single number:

- **The forward passes.** Layer ``k``'s inputs depend on layers ``< k``, so each layer
  needs its own pass over the calibration inputs. :class:`LayerInputs` resumes each pass
  from the cached inputs of the layer's deepest enclosing module that the model calls
  exactly once with one tensor (a residual stage, a block): the modules refitted since
  the cache was made all run inside that module, so its inputs are still exact, and the
  passes cost about one block each instead of the network's prefix. The cache is bounded
  (``cache_bytes``); beyond it the pass resumes from a higher module, or the model.
- **The Gram matrix**, ``(C K2)^2 * N L`` multiply-adds per layer in float64:
  :class:`GramAccumulator` multiplies row-major patches (:func:`conv_patch_rows`, one
  copy) and computes only the upper block triangle of the symmetric product; a float32
  network's patches are multiplied in float32, a chunk at a time, and summed in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gdws_torch.common import conv_patch_rows, conv_patches, take_samples
from gdws_torch.nn.module_tree import eval_mode

__all__ = [
    "GramAccumulator",
    "LayerInputs",
    "PatchMoments",
    "check_products",
    "collect_patch_moments",
    "layer_statistics",
]

_PATCH_CHUNK_BYTES = 64 * 2**20
#: The default memory bound of :class:`LayerInputs`'s cached module inputs.
DEFAULT_CACHE_BYTES = 2 * 2**30
#: float32 patch products are summed over at most this many patches before the sum
#: joins the float64 total (a float32 sum of ``k`` terms is exact to about ``k * 6e-8``
#: relative in the worst case, ``sqrt(k) * 6e-8`` typically).
FLOAT32_CHUNK_ROWS = 1024
_GRAM_BLOCK_COLUMNS = 256
_GRAM_MAX_BLOCKS = 8


class GramAccumulator:
    """``S = sum rows^T rows`` over batches of row-major patches, summed in float64.

    Only the blocks on and above the diagonal are multiplied (``k`` column blocks:
    ``(k + 1) / 2k`` of the work); :meth:`result` mirrors them. The products of one
    :meth:`add` are computed in the rows' dtype (float32 rows: about twice as fast on a
    CPU) and summed into a float64 matrix.

    Parameters
    ----------
    n : int
        Columns of the patches (``C * Kh * Kw``).
    device : torch.device
    """

    def __init__(self, n: int, device: torch.device | str | None = None) -> None:
        blocks = max(1, min(_GRAM_MAX_BLOCKS, n // _GRAM_BLOCK_COLUMNS))
        self.edges = [round(i * n / blocks) for i in range(blocks + 1)]
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        """Add ``rows^T rows`` (``rows``: ``(R, n)``) to the upper block triangle."""
        if rows.dtype != torch.float64:
            for start in range(0, len(rows), FLOAT32_CHUNK_ROWS):
                part = rows[start : start + FLOAT32_CHUNK_ROWS]
                for low, high in itertools.pairwise(self.edges):
                    self.gram[low:high, low:] += part[:, low:high].T @ part[:, low:]
            return
        for low, high in itertools.pairwise(self.edges):
            self.gram[low:high, low:].addmm_(rows[:, low:high].T, rows[:, low:])

    def result(self) -> torch.Tensor:
        """The symmetric ``(n, n)`` Gram matrix."""
        gram = self.gram
        for low, high in itertools.pairwise(self.edges):
            gram[high:, low:high] = gram[low:high, high:].T
        return (gram + gram.T) / 2


class PatchMoments:
    """The sum of a conv's input-patch products over batches of its inputs, in float64.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The conv whose patches are taken (its padding, stride and dilation).
    blocks : bool, default=False
        ``False``: the full Gram matrix ``S = sum p p^T`` of the ``C Kh Kw`` patches
        (:class:`GramAccumulator`). ``True``: its ``C`` diagonal blocks only, each input
        channel's ``Kh Kw x Kh Kw`` sum, ``(C, K2, K2)`` (channels uncorrelated: ``C``
        times less work).
    products : torch.dtype, default=torch.float64
        Of the full Gram matrix's products: ``torch.float32`` multiplies float32 inputs
        as they are, :data:`FLOAT32_CHUNK_ROWS` patches at a time, the chunks summed in
        float64 (about twice as fast on a CPU); float64 inputs always in float64. The
        blocks are always in float64.

    Attributes
    ----------
    patches : int
        Patches summed (inputs times output positions).
    samples : int
        Inputs summed.
    """

    def __init__(
        self, conv: nn.Conv2d, *, blocks: bool = False, products: torch.dtype = torch.float64
    ) -> None:
        self.conv, self.blocks, self.products = conv, blocks, check_products(products)
        self.patches = self.samples = 0
        self._sum: torch.Tensor | int = 0
        self._gram: GramAccumulator | None = None  # made at the first batch: C from it

    def add(self, x: torch.Tensor) -> None:
        """Add the patch products of ``x``, a batch of the conv's inputs ``(N, C, H, W)``."""
        x = x.detach()
        if self.blocks:
            patches = conv_patches(self.conv, x.to(torch.float64))  # (N, C * K2, P)
            n, _, p = patches.shape
            c, k2 = self.conv.in_channels, self.conv.kernel_size[0] * self.conv.kernel_size[1]
            by_channel = patches.reshape(n, c, k2, p).permute(1, 2, 0, 3).reshape(c, k2, n * p)
            self._sum = self._sum + by_channel @ by_channel.transpose(1, 2)
            self.patches += n * p
        else:
            wide = self.products == torch.float64 or x.dtype == torch.float64
            x = x.to(torch.float64 if wide else torch.float32)
            positions, n = conv_patch_rows(self.conv, x[:1]).shape
            if self._gram is None:
                self._gram = GramAccumulator(n, self.conv.weight.device)
            chunk = max(1, _PATCH_CHUNK_BYTES // max(n * positions * x.element_size(), 1))
            for start in range(0, len(x), chunk):
                self._gram.add(conv_patch_rows(self.conv, x[start : start + chunk]))
            self.patches += len(x) * positions
        self.samples += len(x)

    def result(self) -> torch.Tensor:
        """The sum: ``(C*K2, C*K2)``, or ``(C, K2, K2)`` with ``blocks``."""
        if not self.samples:
            raise ValueError("no input was added: the sum is empty.")
        return self._sum if self.blocks else self._gram.result()


def collect_patch_moments(
    model: nn.Module,
    loader: Iterable,
    n_samples: int,
    convs: Mapping[str, nn.Conv2d],
    *,
    blocks: bool = False,
    stage: str = "input patch moments",
) -> dict[str, PatchMoments]:
    """The :class:`PatchMoments` of ``convs`` over the first ``n_samples`` inputs of
    ``loader``, each conv fed the inputs ``model`` gives it (eval mode, no gradients; the
    model's modes restored).

    Parameters
    ----------
    model : torch.nn.Module
        Not modified.
    loader : iterable of images or (images, labels)
    n_samples : int
    convs : mapping of str to torch.nn.Conv2d
        Modules of ``model`` by name.
    blocks : bool, default=False
        See :class:`PatchMoments`.
    stage : str, default="input patch moments"
        What reads the data, for the messages.

    Returns
    -------
    dict of str to PatchMoments
        By name, in ``convs``' order.

    Raises
    ------
    ValueError
        The loader has fewer samples, or a conv never runs in a forward pass.
    """
    moments = {name: PatchMoments(conv, blocks=blocks) for name, conv in convs.items()}
    device = next(iter(model.parameters())).device
    for images, *_ in take_samples(loader, n_samples, stage=stage, device=device):
        handles = [
            conv.register_forward_pre_hook(lambda module, inputs, m=moments[name]: m.add(inputs[0]))
            for name, conv in convs.items()
        ]
        try:
            with eval_mode(model), torch.no_grad():
                model(images)
        finally:
            for handle in handles:
                handle.remove()
    missing = [name for name, m in moments.items() if not m.samples]
    if missing:
        raise ValueError(f"layers {missing[:3]} never ran in a forward pass; exclude them.")
    return moments


def check_products(products: object) -> torch.dtype:
    """``products`` if it is ``torch.float32`` or ``torch.float64``; a clear error otherwise."""
    if not isinstance(products, torch.dtype):
        raise TypeError(f"products must be a torch.dtype; got {type(products).__name__}.")
    if products not in (torch.float32, torch.float64):
        raise ValueError(f"products must be torch.float32 or torch.float64; got {products}.")
    return products


class _LayerReached(Exception):
    """Raised by the hook that captured a module's input: stops the forward pass there."""


@dataclass
class _Cached:
    name: str
    module: nn.Module
    batches: list[torch.Tensor]
    bytes: int


class LayerInputs:
    """The inputs a model feeds its modules over calibration batches, passes resumed.

    Parameters
    ----------
    model : torch.nn.Module
        The network, run in eval mode (its modes restored after each pass) and as it is
        otherwise (fused layers, ...).
    batches : list of torch.Tensor
        Its calibration inputs.
    cache_bytes : int, default=DEFAULT_CACHE_BYTES
        Memory bound of the cached module inputs; ``0`` runs every pass from the model.

    Notes
    -----
    Ask for modules in the order the refit changes them (:meth:`of`): a cached module's
    inputs are kept while the requested modules lie inside it, and dropped at the first
    one outside. A module is resumable when one probe pass (the first sample) calls it
    exactly once, with one tensor and no keyword. Resuming calls exactly the modules the
    full pass would, on the same inputs, so the captured inputs are the same.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[torch.Tensor],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        self.model, self.batches, self.cache_bytes = model, batches, cache_bytes
        self.modules = dict(model.named_modules())
        self.samples = sum(len(b) for b in batches)
        self._stack: list[_Cached] = []
        self._bytes_per_sample = self._probe() if cache_bytes > 0 and batches else {}

    def _probe(self) -> dict[str, int]:
        """Per resumable module, the bytes of one sample's input."""
        calls: dict[str, list] = {}

        def hook(name):
            def record(module, args, kwargs):
                single = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                size = args[0][:1].nelement() * args[0].element_size() if single else None
                calls.setdefault(name, []).append(size)

            return record

        handles = [
            module.register_forward_pre_hook(hook(name), with_kwargs=True)
            for name, module in self.modules.items()
            if name
        ]
        try:
            with torch.no_grad():
                self.model(self.batches[0][:1])
        finally:
            for handle in handles:
                handle.remove()
        return {
            name: sizes[0]
            for name, sizes in calls.items()
            if len(sizes) == 1 and sizes[0] is not None
        }

    def of(self, name: str) -> Iterator[torch.Tensor]:
        """The inputs of module ``name``, batch after batch (a fresh pass from the cache)."""
        while self._stack and not name.startswith(self._stack[-1].name + "."):
            self._stack.pop()
        depth = len(self._stack[-1].name.split(".")) if self._stack else 0
        parts = name.split(".")
        for level in range(depth + 1, len(parts)):
            ancestor = ".".join(parts[:level])
            size = self._bytes_per_sample.get(ancestor)
            if size is None:
                continue
            size *= self.samples
            if sum(c.bytes for c in self._stack) + size <= self.cache_bytes:
                batches = list(self._pass_to(ancestor))
                self._stack.append(_Cached(ancestor, self.modules[ancestor], batches, size))
        return self._pass_to(name)

    def _pass_to(self, name: str) -> Iterator[torch.Tensor]:
        target = self.modules[name]
        if self._stack:
            source, inputs = self._stack[-1].module, self._stack[-1].batches
        else:
            source, inputs = self.model, self.batches
        captured: list[torch.Tensor] = []

        def capture(module, args):
            captured.append(args[0].detach())
            raise _LayerReached  # the rest of the network is not needed

        handle = target.register_forward_pre_hook(capture)
        try:
            for batch in inputs:
                with eval_mode(self.model), torch.no_grad():
                    try:
                        # A copy: a module may work on its input in place.
                        source(batch.clone())
                    except _LayerReached:
                        pass
                if not captured:
                    raise RuntimeError(f"the forward pass never reached {name!r}.")
                yield captured.pop()
        finally:
            handle.remove()


def layer_statistics(
    layer: nn.Module,
    conv: nn.Conv2d,
    work: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    inputs: Iterable[torch.Tensor] | None = None,
    products: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The least-squares statistics of one compressed layer over calibration batches, in
    float64.

    Parameters
    ----------
    layer : GDWSConv2d or LowRankConv2d
        A layer of ``work``; its :attr:`geometry` (the conv that reads the input) gives
        the patches.
    conv : torch.nn.Conv2d
        The dense conv it replaces (its weight ``W``).
    work : torch.nn.Module
        The model whose forward pass feeds ``layer`` (stopped at the layer).
    batches : iterable of torch.Tensor
        Calibration inputs of ``work``.
    inputs : iterable of torch.Tensor, optional
        The layer's own inputs, batch after batch, when already at hand (from
        :meth:`LayerInputs.of`); ``work`` and ``batches`` are not used then.
    products : torch.dtype, default=torch.float32
        The dtype of the patch products: ``torch.float32`` multiplies float32 inputs as
        they are, :data:`FLOAT32_CHUNK_ROWS` patches at a time, and sums the chunks in
        float64 (about twice as fast on a CPU); float64 inputs are always multiplied in
        float64.

    Returns
    -------
    gram : torch.Tensor of shape (C*K2, C*K2)
        ``S = sum patch patch^T`` over the inputs and output positions.
    cross : torch.Tensor of shape (M, C*K2)
        ``W S``.
    energy : float
        ``tr(W S W^T)``, the dense outputs' energy.
    """
    geometry = layer.geometry
    device = geometry.weight.device
    weight = conv.weight.detach().to(device=device, dtype=torch.float64)
    m = weight.shape[0]
    n = weight[0].numel()
    if inputs is None:
        names = {module: name for name, module in work.named_modules()}
        inputs = LayerInputs(work, list(batches), cache_bytes=0).of(names[layer])
    accumulator = PatchMoments(geometry, products=products)
    for x in inputs:
        accumulator.add(x)
    gram = accumulator.result()
    flat_weight = weight.reshape(m, n)
    cross = flat_weight @ gram
    return gram, cross, float((flat_weight * cross).sum())
