"""Per-layer latency tables: what each eligible layer costs, dense and as GDWS, where it runs.

For a layer (its convolution and input shape), a backend, a device and a batch size, the
table holds the latency of the dense convolution, of the GDWS form (channel gather,
depthwise conv, ``1 x 1`` conv) at a grid of kernel counts ``G``, from one kernel per
channel up to the break-even count (where GDWS would need as many MACs as the dense
conv), on multiples of the backend's preferred padding, and of the grouped form (``m``
kernels per channel, one grouped conv with ``groups=C``, no gather) at a grid of
multipliers ``m`` (``m = 1``: the ordinary depthwise-separable layer), of the low-rank form
(``Kh x Kw`` conv ``C -> R``, ``1 x 1`` conv ``R -> M``) at a few ranks ``R`` below its
break-even rank, and, when asked (``gdws_lowrank=True``), of GDWS with a rank-``R``
pointwise at a few ``(G, R)``. All forms of a layer are timed interleaved
(:func:`gdws_torch.cost.throughput.measure_throughput`, medians), with random weights:
latency depends on the shapes, not the values.

Tables are cached as JSON (:mod:`gdws_torch.cost.latency_store`: the file's sections,
keys and checksums), keyed by everything a timing depends on: the machine (processor or
GPU name), the backend and its version, torch's version and thread count, the batch
size, and the layer (shape, stride, padding, dilation, padding mode, bias, input size).
A second conversion on the same machine times nothing. A table is trusted only as far as
it is checked: a file whose content does not match its checksum, made for other
conditions, or with timings at sizes a layer cannot have, is refused.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gdws_approx import LayerLatency, cost
from gdws_approx.files import why_not_writable
from gdws_torch.cost import latency_store as store
from gdws_torch.cost.throughput import BACKENDS, measure_throughput
from gdws_torch.nn.layers import GDWSConv2d
from gdws_torch.nn.lowrank import LowRankConv2d

__all__ = [
    "LatencyTable",
    "default_cache",
    "gdws_lowrank_grid",
    "kernel_grid",
    "layer_description",
    "machine_description",
    "measure_layer",
    "multiplier_grid",
    "network_description",
    "rank_grid",
]

# Kernel counts timed per layer (the planner interpolates between them).
GRID_POINTS = 8
# Ranks timed per layer: few, since every point adds to the table's building time.
RANK_POINTS = 4
# The multiple each backend runs depthwise convs fastest at (ONNX Runtime pads G to 4).
PREFERRED_MULTIPLE = {
    "eager": 1,
    "channels_last": 1,
    "onnxruntime": 4,
    "openvino": 4,
    "tensorrt": 4,
}


def default_cache() -> Path:
    """``$GDWS_CACHE_DIR/latency-tables.json``, else the user's cache folder
    (``$XDG_CACHE_HOME/gdws-approx`` or ``~/.cache/gdws-approx``); ``~`` is expanded."""
    root = os.environ.get("GDWS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "gdws-approx"
    )
    return Path(os.path.expanduser(root)) / "latency-tables.json"


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _backend_version(backend: str) -> str:
    if backend in ("onnxruntime", "tensorrt"):
        import onnxruntime

        provider = " (TensorRT execution provider)" if backend == "tensorrt" else ""
        return f"onnxruntime {onnxruntime.__version__}{provider}"
    if backend == "openvino":
        import openvino

        return f"openvino {openvino.__version__}"
    return f"torch {torch.__version__} ({backend})"


def machine_description(backend: str, device: Any = "cpu") -> dict[str, Any]:
    """What a timing depends on besides the layer: device, backend and version, threads."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _processor()
    return {
        "device": f"{device.type}: {name}",
        "backend": backend,
        "backend_version": _backend_version(backend),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def layer_description(conv: nn.Conv2d, input_shape: Sequence[int]) -> dict[str, Any]:
    """The layer's shape and options and its input shape (one sample)."""
    return {
        "weight": list(conv.weight.shape),
        "input": [int(s) for s in input_shape],
        "stride": list(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
        "dilation": list(conv.dilation),
        "padding_mode": conv.padding_mode,
        "bias": conv.bias is not None,
    }


def network_description(model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """What a whole network's timing depends on: its modules, parameter and buffer shapes
    and dtypes (hashed) and its input shape (one sample)."""
    structure = hashlib.sha256(repr(model).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        structure.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return {
        "class": type(model).__name__,
        "structure": structure.hexdigest()[:24],
        "input": [int(s) for s in input_shape],
    }


def kernel_grid(conv: nn.Conv2d, multiple: int = 1, points: int = GRID_POINTS) -> list[int]:
    """Kernel counts to time: geometric from one per channel (``C``) to below break-even,
    rounded up to ``multiple``."""
    m, c, kh, kw = conv.weight.shape
    top = cost.break_even_kernels(m, c, kh * kw)
    low = max(1, c)
    if top <= low:
        return [_round_up(low, multiple)]
    ratio = (top / low) ** (1 / max(points - 1, 1))
    grid = {_round_up(round(low * ratio**i), multiple) for i in range(points)}
    return sorted(g for g in grid if g <= max(top, _round_up(low, multiple)))


def multiplier_grid(conv: nn.Conv2d) -> list[int]:
    """Channel multipliers to time the grouped form at: 1, 2, 3, 4, 6, 8 up to the
    largest that keeps fewer MACs than the dense conv and at most ``min(Kh*Kw, M)``
    kernels per channel (the rank of a channel's kernels)."""
    m, c, kh, kw = conv.weight.shape
    top = min(kh * kw, m, max(1, cost.break_even_kernels(m, c, kh * kw) // c))
    return [g for g in (1, 2, 3, 4, 6, 8) if g <= top]


def rank_grid(conv: nn.Conv2d, points: int = RANK_POINTS) -> list[int]:
    """Ranks to time the low-rank form at: geometric from an eighth of the break-even
    rank (the largest with fewer MACs than the dense conv, at most ``min(M, C*Kh*Kw)``)
    up to it."""
    m, c, kh, kw = conv.weight.shape
    dense = cost.dense_macs(m, c, kh * kw)
    top = max(1, min(m, c * kh * kw, (dense - 1) // cost.lowrank_macs(1, c, kh * kw, m)))
    low = max(1, round(top / 8))
    ratio = (top / low) ** (1 / max(points - 1, 1))
    return sorted({min(top, round(low * ratio**i)) for i in range(points)})


def gdws_lowrank_grid(conv: nn.Conv2d, kernel_counts: Sequence[int]) -> list[tuple[int, int]]:
    """``(G, R)`` to time GDWS with a rank-``R`` pointwise at: the smallest, middle and
    largest of ``kernel_counts``, each at ``R = M/4`` and ``M/2`` (below ``G``)."""
    m = conv.out_channels
    counts = sorted(set(kernel_counts))
    chosen = {counts[0], counts[len(counts) // 2], counts[-1]}
    ranks = sorted({max(1, m // 4), max(1, m // 2)})
    return [(g, r) for g in sorted(chosen) for r in ranks if r < g]


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def check_entry(latency: LayerLatency, layer: Mapping[str, Any], backend: str) -> None:
    """Refuse timings at sizes the layer cannot have: ``G`` below one kernel per channel
    (it would drop input channels) or above every channel's rank (``min(M, Kh*Kw)``
    kernels each, padded to the backend's multiple), multipliers above that rank, ranks
    above ``min(M, C*Kh*Kw)``, GDWS-low-rank points outside both."""
    m, c, kh, kw = (int(s) for s in layer["weight"])
    rank = min(m, kh * kw)
    low, high = c, _round_up(c * rank, PREFERRED_MULTIPLE.get(backend, 1))
    counts = latency.kernel_counts
    if counts[0] < low or counts[-1] > high:
        raise ValueError(
            f"kernel_counts {list(counts)} lie outside {low}..{high}, the kernel counts of a "
            f"layer with {c} input channels of rank {rank} (fewer than {c} would drop input "
            "channels)"
        )
    if latency.multipliers and latency.multipliers[-1] > rank:
        raise ValueError(
            f"multipliers {list(latency.multipliers)} exceed the channels' rank {rank}"
        )
    if latency.ranks and latency.ranks[-1] > min(m, c * kh * kw):
        raise ValueError(
            f"ranks {list(latency.ranks)} exceed the layer's rank {min(m, c * kh * kw)}"
        )
    for g, r in latency.gdws_lowrank_points:
        if not (low <= g <= high and r <= m):
            raise ValueError(
                f"the GDWS low-rank point (G={g}, R={r}) lies outside the layer's sizes"
            )


def _forms(latency: LayerLatency) -> dict[str, dict[str, list]]:
    """A layer's timings as the file stores them: one entry per form."""
    forms = {
        "dense": {"ms": latency.dense_ms},
        "gdws": {"kernel_counts": list(latency.kernel_counts), "ms": list(latency.gdws_ms)},
        "grouped": {"multipliers": list(latency.multipliers), "ms": list(latency.grouped_ms)},
        "lowrank": {"ranks": list(latency.ranks), "ms": list(latency.lowrank_ms)},
    }
    if latency.gdws_lowrank_points:
        forms["gdws_lowrank"] = {
            "points": [list(point) for point in latency.gdws_lowrank_points],
            "ms": list(latency.gdws_lowrank_ms),
        }
    return forms


def _latency(forms: Mapping[str, Any]) -> LayerLatency:
    """:func:`_forms` read back: ``dense`` and ``gdws`` are needed, a form missing was not
    timed, and forms this version does not plan with are skipped."""
    grouped = forms.get("grouped", {"multipliers": [], "ms": []})
    lowrank = forms.get("lowrank", {"ranks": [], "ms": []})
    gdws_lowrank = forms.get("gdws_lowrank", {"points": [], "ms": []})
    return LayerLatency(
        forms["dense"]["ms"],
        tuple(forms["gdws"]["kernel_counts"]),
        tuple(forms["gdws"]["ms"]),
        tuple(grouped["multipliers"]),
        tuple(grouped["ms"]),
        tuple(lowrank["ranks"]),
        tuple(lowrank["ms"]),
        tuple(map(tuple, gdws_lowrank["points"])),
        tuple(gdws_lowrank["ms"]),
    )


def _gdws_layer(conv: nn.Conv2d, n_kernels: int) -> GDWSConv2d:
    """A GDWS layer with ``n_kernels`` random kernels spread over the channels, gathering
    (the form any allocation runs as); its latency does not depend on the values."""
    c = conv.in_channels
    per_channel = torch.full((c,), n_kernels // c, dtype=torch.long)
    per_channel[: n_kernels % c] += 1
    if n_kernels == c > 1:  # not the identity order, which would skip the gather
        per_channel[0], per_channel[-1] = 2, 0
    channels = torch.repeat_interleave(torch.arange(c), per_channel)
    return _random_layer(conv, channels)


def _random_layer(conv: nn.Conv2d, channels: torch.Tensor, grouped: bool = False) -> GDWSConv2d:
    g = channels.numel()
    kh, kw = conv.kernel_size
    layer = GDWSConv2d.from_factors(
        conv,
        torch.randn(g, kh, kw, dtype=conv.weight.dtype),
        channels,
        torch.randn(conv.out_channels, g, dtype=conv.weight.dtype),
    )
    return (layer.uniform() if grouped else layer).eval()


def _lowrank_layer(conv: nn.Conv2d, rank: int, n_kernels: int | None = None) -> LowRankConv2d:
    """A low-rank layer (a GDWS first stage with ``n_kernels``) with random weights."""
    m, c, kh, kw = conv.weight.shape
    dtype = conv.weight.dtype
    second = torch.randn(m, rank, dtype=dtype)
    if n_kernels is None:
        return LowRankConv2d.from_factors(conv, torch.randn(rank, c * kh * kw, dtype=dtype), second)
    channels = _gdws_layer(conv, n_kernels).kernel_channels
    kernels = torch.randn(n_kernels, kh, kw, dtype=dtype)
    inner = torch.randn(rank, n_kernels, dtype=dtype)
    return LowRankConv2d.from_gdws_factors(conv, kernels, channels, inner, second).eval()


def measure_layer(
    conv: nn.Conv2d,
    input_shape: Sequence[int],
    *,
    backend: str = "eager",
    batch_size: int = 1,
    device: Any = "cpu",
    kernel_counts: Sequence[int] | None = None,
    multipliers: Sequence[int] | None = None,
    ranks: Sequence[int] | None = None,
    gdws_lowrank_points: Sequence[tuple[int, int]] = (),
    rounds: int = 9,
) -> LayerLatency:
    """Time one layer dense, as GDWS at ``kernel_counts``, grouped at ``multipliers``,
    low-rank at ``ranks`` and GDWS with a low-rank pointwise at ``gdws_lowrank_points``.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The layer (``groups=1``); a float32 copy with random weights is timed.
    input_shape : sequence of int
        Its input, one sample ``(C, H, W)``.
    backend, batch_size, device
        Where and how (:func:`gdws_torch.cost.throughput.measure_throughput`).
    kernel_counts : sequence of int, optional
        Default :func:`kernel_grid` on the backend's preferred multiple.
    multipliers : sequence of int, optional
        Default :func:`multiplier_grid`; ``()`` times no grouped form.
    ranks : sequence of int, optional
        Default :func:`rank_grid`; ``()`` times no low-rank form.
    gdws_lowrank_points : sequence of (int, int), default=()
        ``(G, R)`` pairs (:func:`gdws_lowrank_grid`); none by default.
    rounds : int, default=9
        Interleaved timing rounds (medians).

    Returns
    -------
    gdws_approx.LayerLatency
    """
    dense = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).eval()
    counts = list(kernel_counts or kernel_grid(dense, PREFERRED_MULTIPLE.get(backend, 1)))
    grid = list(multiplier_grid(dense) if multipliers is None else multipliers)
    ranks = list(rank_grid(dense) if ranks is None else ranks)
    points = [(int(g), int(r)) for g, r in gdws_lowrank_points]
    channels = torch.arange(dense.in_channels)
    models = {"dense": dense}
    models.update({f"gdws-{g}": _gdws_layer(dense, g) for g in counts})
    models.update(
        {f"grouped-{m}": _random_layer(dense, channels.repeat_interleave(m), True) for m in grid}
    )
    models.update({f"lowrank-{r}": _lowrank_layer(dense, r).eval() for r in ranks})
    models.update({f"gdws-{g}-lowrank-{r}": _lowrank_layer(dense, r, g) for g, r in points})
    rows = measure_throughput(
        models,
        input_shape,
        backends=(backend,),
        batch_sizes=(batch_size,),
        rounds=rounds,
        device=device,
    )
    ms = {row["model"]: row["latency_ms"] for row in rows}
    return LayerLatency(
        dense_ms=ms["dense"],
        kernel_counts=tuple(counts),
        gdws_ms=tuple(ms[f"gdws-{g}"] for g in counts),
        multipliers=tuple(grid),
        grouped_ms=tuple(ms[f"grouped-{m}"] for m in grid),
        ranks=tuple(ranks),
        lowrank_ms=tuple(ms[f"lowrank-{r}"] for r in ranks),
        gdws_lowrank_points=tuple(points),
        gdws_lowrank_ms=tuple(ms[f"gdws-{g}-lowrank-{r}"] for g, r in points),
    )


class LatencyTable:
    """Latency curves of layers on one machine, backend and batch size, cached as JSON.

    Parameters
    ----------
    backend : str
        From :data:`gdws_torch.cost.throughput.BACKENDS`.
    batch_size : int, default=1
    device : default="cpu"
    path : path-like or None, default=None
        The JSON file the table is read from and saved to (a symbolic link is written
        through); ``None``: in memory only (use :meth:`default` for the user cache,
        :func:`default_cache`). The tables of other machines, backends and batch sizes in
        the same file are kept.
    add_key : bool, default=False
        Whether a file holding only tables made for other conditions (machine, backend
        and version, torch, threads, batch size) may get a table for these. ``False``
        refuses it, naming what differs (a table timed with other threads, another
        backend version or on another machine would mislead the plan); :meth:`default`
        and ``gdws latency-table`` add one.
    gdws_lowrank : bool, default=False
        Also time GDWS with a low-rank pointwise (:func:`gdws_lowrank_grid`); such
        tables are kept apart from the others (their key says so).

    Raises
    ------
    ValueError
        ``path`` is not a latency table, is of an older format, fails its checksum, has
        no table for these conditions (without ``add_key``), or holds timings at kernel
        counts outside a layer's range.

    Attributes
    ----------
    measured : int
        Layers timed by this object (0 when all came from the file).
    saved : int
        Of those, the layers saved to :attr:`path` so far.
    not_cached : str or None
        Why the timings are not saved (:meth:`default` on a cache that cannot be
        written), else ``None``.
    """

    def __init__(
        self,
        backend: str,
        batch_size: int = 1,
        device: Any = "cpu",
        path: str | os.PathLike | None = None,
        *,
        add_key: bool = False,
        gdws_lowrank: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        self.machine = machine_description(backend, device)
        self.backend, self.batch_size, self.device = backend, batch_size, torch.device(device)
        self.gdws_lowrank = bool(gdws_lowrank)
        self.key = {**self.machine, "batch_size": batch_size}
        if self.gdws_lowrank:
            self.key["gdws_lowrank"] = True
        self.path = None if path is None else Path(path)
        self.measured = self.saved = 0
        self.not_cached: str | None = None
        self._layers: dict[str, dict] = {}
        self._networks: dict[str, dict] = {}
        self._unsaved = False
        if self.path is not None and (self.path.exists() or self.path.is_symlink()):
            sections = store.read_sections(self.path)
            section = store.find_section(sections, self.key)
            alike = any(store.same_conditions(s["key"], self.key) for s in sections)
            if section is None and sections and not (add_key or alike):
                raise ValueError(store.key_mismatch(self.path, sections, self.key))
            if section is not None:
                self._layers, self._networks = section["layers"], section["networks"]
                for entry in self._layers.values():
                    self._checked(entry)

    @classmethod
    def default(
        cls, backend: str, batch_size: int = 1, device: Any = "cpu", *, gdws_lowrank: bool = False
    ) -> LatencyTable:
        """A table cached in :func:`default_cache`. A cache that cannot be written is read
        if it exists and not written (a ``UserWarning`` and :attr:`not_cached` say so)."""
        path = default_cache()
        reason = why_not_writable(os.path.realpath(path))
        kind = {"gdws_lowrank": gdws_lowrank}
        if reason and not path.is_file():  # nothing to read there either
            table = cls(backend, batch_size, device, None, **kind)
        else:
            table = cls(backend, batch_size, device, path, add_key=True, **kind)
        if reason:
            table.not_cached = (
                f"the latency cache {str(path)!r} cannot be written ({reason}): layers timed "
                "now are not cached (set GDWS_CACHE_DIR to a writable folder)"
            )
            warnings.warn(table.not_cached, stacklevel=2)
        return table

    def _checked(self, entry: Mapping[str, Any]) -> LayerLatency:
        """The latencies of a file's entry, checked against its layer."""
        try:
            latency = _latency(entry["forms"])
            check_entry(latency, entry["layer"], self.backend)
        except (KeyError, TypeError, ValueError) as exc:
            where = entry.get("layer", {}).get("weight") if isinstance(entry, dict) else None
            raise ValueError(
                f"latency table {str(self.path)!r}: the entry of the layer of shape {where} is "
                f"refused ({exc}); time the table again: delete the file or give another."
            ) from None
        return latency

    def get(self, conv: nn.Conv2d, input_shape: Sequence[int]) -> LayerLatency | None:
        """The cached latencies of this layer here, or ``None``."""
        entry = self._layers.get(store.entry_id(layer_description(conv, input_shape)))
        return None if entry is None else self._checked(entry)

    def layer(
        self, conv: nn.Conv2d, input_shape: Sequence[int], *, rounds: int = 9
    ) -> LayerLatency:
        """The latencies of this layer: from the table, or timed now and added to it."""
        found = self.get(conv, input_shape)
        if found is not None:
            return found
        points = ()
        if self.gdws_lowrank:
            counts = kernel_grid(conv, PREFERRED_MULTIPLE.get(self.backend, 1))
            points = gdws_lowrank_grid(conv, counts)
        latency = measure_layer(
            conv,
            input_shape,
            backend=self.backend,
            batch_size=self.batch_size,
            device=self.device,
            gdws_lowrank_points=points,
            rounds=rounds,
        )
        self.add(conv, input_shape, latency)
        self.measured += 1
        return latency

    def add(self, conv: nn.Conv2d, input_shape: Sequence[int], latency: LayerLatency) -> None:
        """Record latencies of this layer measured elsewhere (replacing any entry)."""
        if not isinstance(latency, LayerLatency):
            raise TypeError(f"latency must be a LayerLatency; got {type(latency).__name__}.")
        layer = layer_description(conv, input_shape)
        try:
            check_entry(latency, layer, self.backend)
        except ValueError as exc:
            raise ValueError(f"latency: {exc}.") from None
        self._layers[store.entry_id(layer)] = {"layer": layer, "forms": _forms(latency)}
        self._unsaved = True

    def missing(
        self, convs: Mapping[str, nn.Conv2d], input_shapes: Mapping[str, Sequence[int]]
    ) -> list[str]:
        """The names of the convs this table has no latencies for."""
        return [name for name in convs if self.get(convs[name], input_shapes[name]) is None]

    def check_writable(self) -> None:
        """Refuse a table whose file cannot be written (before anything is timed for it).

        Raises
        ------
        ValueError
            Naming the file and why.
        """
        if self.path is None or self.not_cached:
            return
        reason = why_not_writable(os.path.realpath(self.path))
        if reason:
            raise ValueError(
                f"latency table {str(self.path)!r}: {reason}; the layers it lacks would be "
                "timed for nothing. Give a file that can be written."
            )

    def layers(
        self,
        convs: Mapping[str, nn.Conv2d],
        input_shapes: Mapping[str, Sequence[int]],
        *,
        rounds: int = 9,
        progress: bool = False,
    ) -> dict[str, LayerLatency]:
        """:meth:`layer` for every named conv; what was timed is saved, also when the loop
        is interrupted (Ctrl-C keeps the layers already timed).

        Raises
        ------
        ValueError
            A layer must be timed and the file cannot be written (before any timing).
        """
        from tqdm.auto import tqdm

        if self.missing(convs, input_shapes):
            self.check_writable()
        out = {}
        try:
            for name in tqdm(list(convs), desc="latency table", unit="layer", disable=not progress):
                out[name] = self.layer(convs[name], input_shapes[name], rounds=rounds)
        except BaseException:
            with contextlib.suppress(Exception):  # keep what was timed; the error goes on
                self._save_timed()
            raise
        self._save_timed()
        return out

    def network(self, model: nn.Module, input_shape: Sequence[int], *, rounds: int = 15) -> float:
        """The whole dense ``model``'s latency in ms: from the table, or timed now (a float32
        copy, eval mode) and saved. Planning from it makes the same call plan alike."""
        description = network_description(model, input_shape)
        key = store.entry_id(description)
        entry = self._networks.get(key)
        if entry is not None:
            try:
                ms = float(entry["dense_ms"])
            except (KeyError, TypeError, ValueError):
                ms = math.nan
            if not (math.isfinite(ms) and ms > 0):
                raise ValueError(
                    f"latency table {str(self.path)!r}: a network's dense_ms is not a positive "
                    "number; time the table again: delete the file or give another."
                )
            return ms
        self.check_writable()
        (row,) = measure_throughput(
            {"dense": copy.deepcopy(model).float().eval()},
            input_shape,
            backends=(self.backend,),
            batch_sizes=(self.batch_size,),
            rounds=rounds,
            device=self.device,
        )
        self._networks[key] = {"network": description, "dense_ms": row["latency_ms"]}
        self._unsaved = True
        self._save_timed()
        return row["latency_ms"]

    def _save_timed(self) -> None:
        if self._unsaved and self.path is not None and not self.not_cached:
            self.save()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Merge the table into ``path`` or its own path: under a lock, with the file's
        other tables and entries (also those written meanwhile by other processes),
        atomically, keeping the file's permissions; returns the path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("this latency table has no path: give one to save it.")
        store.write_section(target, self.key, self._layers, self._networks)
        if target == self.path:
            self._unsaved, self.saved = False, self.measured
        return target

    def __len__(self) -> int:
        return len(self._layers)
