"""The refit's statistics: row-major patches, the block-triangular Gram matrix, and the
passes resumed from cached module inputs (the same inputs, fewer modules run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_recovery import numpy_patches
from torch import nn

from gdws_torch import GDWSConv2d, convert
from gdws_torch.common import conv_patch_rows
from gdws_torch.recovery import refit_error, refit_gdws, refit_layer_factors
from gdws_torch.recovery.statistics import GramAccumulator, LayerInputs, layer_statistics


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.Conv2d(3, 4, (3, 1), padding=(1, 0)),
        nn.Conv2d(3, 4, 3, padding=2, dilation=2),
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
    ],
    ids=["3x3", "stride2", "3x1", "dilated", "reflect"],
)
def test_patch_rows_are_the_explicit_patches_one_per_row(conv):
    x = torch.rand(2, 3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = conv_patch_rows(conv, x)
    np.testing.assert_array_equal(rows.numpy(), numpy_patches(conv, x.numpy()).T)


@pytest.mark.parametrize("n", [5, 256, 700, 1300])
def test_the_block_triangular_gram_is_the_full_product(n):
    generator = torch.Generator().manual_seed(n)
    accumulator = GramAccumulator(n)
    batches = [torch.randn(r, n, dtype=torch.float64, generator=generator) for r in (9, 40)]
    for rows in batches:
        accumulator.add(rows)
    want = sum(rows.numpy().T @ rows.numpy() for rows in batches)
    got = accumulator.result().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-10)
    assert np.array_equal(got, got.T)


class Block(nn.Module):
    """Pre-activation block whose first op works in place on its input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.act = nn.Hardtanh(-0.5, 2.0, inplace=True)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = self.act(x.mul_(2.0))  # a cached input reused as it is would double every pass
        return x + self.conv2(F.relu(self.conv1(x)))


class Scaled(nn.Module):
    """Called with a keyword: cannot be resumed."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, *, scale=1.0):
        return self.conv(x) * scale


class Staged(nn.Module):
    """Stem, two stages of blocks, a conv shared by two calls, a keyword-called module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.stage1 = nn.Sequential(Block(6), Block(6))
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(Block(8), Block(8))
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.scaled = Scaled(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x) - 0.2)))
        x = self.scaled(self.shared(F.relu(self.shared(x))), scale=0.5)
        return self.head(x.mean((2, 3)))


def staged(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Staged().double().eval()


def batches(n_batches: int = 3, size: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.rand(size, 3, 8, 8, dtype=torch.float64, generator=generator)
        for _ in range(n_batches)
    ]


def full_pass_inputs(model, name, data) -> list[torch.Tensor]:
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone())
    )
    out = []
    with torch.no_grad():
        for x in data:
            seen.clear()
            model(x)
            out.append(seen[0])  # a module called twice: its first call
    handle.remove()
    return out


def test_resumed_passes_give_each_modules_inputs_and_run_fewer_modules():
    model, data = staged(), batches()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    stem_calls = []
    model.stem.register_forward_hook(lambda *_: stem_calls.append(1))
    runs = {}
    for cache_bytes in (0, 10**9):
        stem_calls.clear()
        feeds = LayerInputs(model, data, cache_bytes)
        got = {name: [x.clone() for x in feeds.of(name)] for name in names}
        runs[cache_bytes] = len(stem_calls)
        for name in names:
            want = full_pass_inputs(model, name, data)
            assert len(got[name]) == len(want)
            for a, b in zip(got[name], want, strict=True):
                assert torch.equal(a, b), name
    # Without the cache every pass runs the stem (but the stem's own); with it, the
    # stages' inputs are computed once and the blocks' passes start inside them.
    assert runs[0] == (len(names) - 1) * len(data)
    assert runs[10**9] < runs[0] / 2


def test_the_cache_respects_its_memory_bound():
    model, data = staged(), batches()
    stem_calls = []
    model.stem.register_forward_hook(lambda *_: stem_calls.append(1))
    one_stage = 6 * 8 * 8 * 8 * sum(len(x) for x in data)  # stage1's input, float64
    feeds = LayerInputs(model, data, cache_bytes=one_stage)
    for name in ("stage1.0.conv1", "stage1.0.conv2", "stage1.1.conv1"):
        list(feeds.of(name))
    # stage1's input fits, its blocks' do not as well: each pass resumes from stage1.
    assert len(stem_calls) == 1 + len(data)
    assert sum(c.bytes for c in feeds._stack) <= one_stage


def test_statistics_from_resumed_inputs_equal_the_full_pass():
    model, data = staged(), batches()
    converted, _ = convert(
        model, input_size=(3, 8, 8), target_mac_reduction=1.5, exclude=["shared"]
    )
    layers = [n for n, m in converted.named_modules() if isinstance(m, GDWSConv2d)]
    assert any(n.startswith("stage2.1") for n in layers)
    feeds = LayerInputs(converted, data)
    dense = dict(model.named_modules())
    for name in layers:
        layer = converted.get_submodule(name)
        resumed = layer_statistics(layer, dense[name], converted, data, inputs=feeds.of(name))
        full = layer_statistics(layer, dense[name], converted, data)
        for a, b in zip(resumed[:2], full[:2], strict=True):
            assert torch.equal(a, b)
        assert resumed[2] == full[2]


def test_the_refit_with_the_cache_equals_the_refit_without():
    model, data = staged(), batches()
    converted, _ = convert(
        model, input_size=(3, 8, 8), target_mac_reduction=1.5, exclude=["shared"]
    )
    loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in data]
    n = sum(len(x) for x in data)
    cached = refit_gdws(model, converted, loader, n, progress=False)
    plain = refit_gdws(model, converted, loader, n, cache_bytes=0, progress=False)
    changed = False
    for (key, a), b, before in zip(
        cached.state_dict().items(),
        plain.state_dict().values(),
        converted.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), key
        changed |= not torch.equal(a, before)
    assert changed  # the refit did something


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), ("big", TypeError)]
)
def test_bad_cache_bytes_is_refused(value, error):
    model, data = staged(), batches(1)
    converted, _ = convert(
        model, input_size=(3, 8, 8), target_mac_reduction=1.5, exclude=["shared"]
    )
    with pytest.raises(error, match="cache_bytes"):
        refit_gdws(model, converted, [(data[0], None)], 4, cache_bytes=value, progress=False)


def test_float32_products_sum_in_float64_within_their_rounding():
    generator = torch.Generator().manual_seed(5)
    rows = torch.rand(5000, 300, generator=generator)  # float32, like a network's activations
    accumulator = GramAccumulator(300)
    accumulator.add(rows)
    want = rows.double().numpy().T @ rows.double().numpy()
    got = accumulator.result().numpy()
    # Sums of at most 1024 float32 products, then float64: far below 1e-6 relative.
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
    assert np.abs(got - want).max() > 0  # the float32 products did run


def test_float32_statistics_give_the_float64_refit_within_their_tolerance():
    model = staged().float()
    data = [x.float() for x in batches(4, 8)]
    converted, _ = convert(
        model, input_size=(3, 8, 8), target_mac_reduction=1.5, exclude=["shared"]
    )
    dense = dict(model.named_modules())
    for name in ("stage1.0.conv1", "stage2.1.conv2"):
        layer = converted.get_submodule(name)
        wide = layer_statistics(layer, dense[name], converted, data, products=torch.float64)
        narrow = layer_statistics(layer, dense[name], converted, data, products=torch.float32)
        assert not torch.equal(wide[0], narrow[0])
        torch.testing.assert_close(narrow[0], wide[0], rtol=1e-6, atol=1e-6 * wide[0].abs().max())
        factors = (
            layer.kernel_channels,
            layer.pointwise.weight.detach().double().flatten(1),
            layer.depthwise.weight.detach().double().flatten(1),
        )
        _, _, errors = refit_layer_factors(*wide[:2], *factors, energy=wide[2])
        p32, k32, _ = refit_layer_factors(*narrow[:2], *factors, energy=narrow[2])
        # The float32 statistics' factors, judged by the float64 statistics.
        error = refit_error(wide[0], wide[1], wide[2], layer.kernel_channels, p32, k32)
        assert error == pytest.approx(errors[-1], rel=1e-4)


@pytest.mark.parametrize(("value", "error"), [(torch.float16, ValueError), ("float32", TypeError)])
def test_bad_products_are_refused_before_any_work(value, error):
    model, data = staged(), batches(1)
    converted, _ = convert(
        model, input_size=(3, 8, 8), target_mac_reduction=1.5, exclude=["shared"]
    )
    with pytest.raises(error, match="products"):
        refit_gdws(model, converted, [(data[0], None)], 4, products=value, progress=False)
