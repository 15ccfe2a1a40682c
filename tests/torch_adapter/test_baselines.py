"""The training-free baselines at the same conv MACs: DWS, low-rank, channel pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _torch_models import INPUT_SIZE, NoEligible, small_resnet
from torch import nn

from gdws_approx import GDWSApproximator
from gdws_torch import GDWSConv2d, compress_baseline, count_macs, eligible_convs
from gdws_torch.baselines import (
    LowRankConv2d,
    PrunablePair,
    dws_layer,
    lowrank_basis,
    prunable_pairs,
    prune_channels,
)

N_SAMPLES, BATCH = 16, 8


class TinyResNet(nn.Module):
    """Stem, two basic blocks (conv1 -> bn -> relu -> conv2, plus the identity), a head:
    each block's conv1 is prunable, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
            block.bn1 = nn.BatchNorm2d(16)
            block.conv2 = nn.Conv2d(16, 8, 3, padding=1, bias=True)
            block.bn2 = nn.BatchNorm2d(8)
            self.blocks.append(block)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        for block in self.blocks:
            out = F.relu(block.bn1(block.conv1(x)))
            x = F.relu(block.bn2(block.conv2(out)) + x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tiny_resnet(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    model = TinyResNet().double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def loader(n: int = N_SAMPLES, batch: int = BATCH, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, *INPUT_SIZE, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (n,), generator=generator)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


def inputs(seed: int = 5, n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *INPUT_SIZE, dtype=torch.float64, generator=generator)


def layer_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """What ``model`` feeds its module ``name`` on ``x`` (independent of the library)."""
    seen = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def all_images(batches) -> torch.Tensor:
    return torch.cat([images for images, _ in batches])


# -- each form, built exactly ------------------------------------------------------------


@pytest.mark.parametrize("moment", [False, True])
def test_the_lowrank_pair_at_full_rank_equals_the_dense_conv(moment):
    model = small_resnet()
    x = torch.randn(2, 24, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name, conv in eligible_convs(model):
        if name == "block.conv1":
            continue  # reads 8 channels; the others read the same 24-channel input
        m = conv.out_channels
        generator = torch.Generator().manual_seed(2)
        a = torch.randn(m, m, dtype=torch.float64, generator=generator)
        basis, values = lowrank_basis(conv.weight, a @ a.T if moment else None)
        assert basis.shape == (m, min(m, conv.weight[0].numel()))
        assert torch.all(values[:-1] >= values[1:])
        first = basis.T @ conv.weight.detach().flatten(1)
        pair = LowRankConv2d.from_factors(conv, first, basis)
        assert isinstance(pair, LowRankConv2d) and pair.rank == basis.shape[1]
        torch.testing.assert_close(pair.dense_weight(), conv.weight, rtol=0, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(pair(x), conv(x), rtol=0, atol=1e-11)


def test_dws_equals_the_core_gdws_with_one_kernel_per_channel():
    model = small_resnet()
    for name, conv in eligible_convs(model):
        c = conv.in_channels
        x = torch.randn(2, c, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        core = GDWSApproximator(solver="mego", n_kernels=c, max_multiplier=1)
        expected = GDWSConv2d.from_estimator(core.fit(conv.weight.detach()), conv)
        layer = dws_layer(conv)
        assert layer.multipliers.tolist() == [1] * c and not layer.gathers, name
        torch.testing.assert_close(
            layer.dense_weight(), expected.dense_weight(), rtol=0, atol=1e-12
        )
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected(x), rtol=0, atol=1e-11)


def test_compressed_dws_layers_are_the_core_dws_and_the_rest_is_dense():
    model = small_resnet()
    compressed, report = compress_baseline(
        model, "dws", target_mac_reduction=2.0, input_size=INPUT_SIZE
    )
    modules = dict(compressed.named_modules())
    forms = {layer.name: layer.form for layer in report.layers}
    assert set(forms.values()) <= {"dws", "dense"} and "dws" in forms.values()
    for name, conv in eligible_convs(model):
        built = modules[name]
        if forms[name] == "dense":
            assert isinstance(built, nn.Conv2d) and torch.equal(built.weight, conv.weight)
        else:
            core = GDWSApproximator(solver="mego", n_kernels=conv.in_channels, max_multiplier=1)
            dense = GDWSConv2d.from_estimator(core.fit(conv.weight.detach()), conv).dense_weight()
            torch.testing.assert_close(built.dense_weight(), dense, rtol=0, atol=1e-12)


def test_pruning_nothing_equals_the_dense_network():
    model = tiny_resnet()
    pairs = prunable_pairs(model)
    keep = {p.producer: range(dict(model.named_modules())[p.producer].out_channels) for p in pairs}
    pruned = prune_channels(model, keep)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=0)
    assert count_macs(pruned, INPUT_SIZE).conv_macs == count_macs(model, INPUT_SIZE).conv_macs


def test_pruned_channels_are_the_dense_network_without_their_contribution():
    """Removing channels = the dense network whose consumer ignores them (exactly)."""
    model = tiny_resnet()
    keep = {"blocks.0.conv1": [1, 4, 5, 11], "blocks.1.conv1": [0, 2, 3, 7, 8, 9, 15]}
    pruned = prune_channels(model, keep)
    masked = tiny_resnet()
    with torch.no_grad():
        for producer, kept in keep.items():
            consumer = dict(masked.named_modules())[producer.replace("conv1", "conv2")]
            dropped = sorted(set(range(16)) - set(kept))
            consumer.weight[:, dropped] = 0
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked(x), rtol=0, atol=1e-12)
    assert pruned.blocks[0].conv1.out_channels == 4 and pruned.blocks[0].bn1.num_features == 4
    assert pruned.blocks[1].conv2.in_channels == 7
    macs = count_macs(pruned, INPUT_SIZE)
    assert macs["blocks.0.conv2"].macs == 8 * 4 * 9 * 256


def test_prunable_pairs_follow_only_per_channel_paths():
    # small_resnet: the stem feeds two convs, `dilated` an addition, `reflect` a grouped
    # conv; only the block's first conv qualifies.
    assert prunable_pairs(small_resnet()) == [
        PrunablePair("block.conv1", "block.conv2", ["block.bn1"])
    ]
    assert [(p.producer, p.consumer) for p in prunable_pairs(tiny_resnet())] == [
        ("blocks.0.conv1", "blocks.0.conv2"),
        ("blocks.1.conv1", "blocks.1.conv2"),
    ]


def test_the_reconstruction_greedy_removes_the_least_error_per_mac_saved():
    from gdws_torch.baselines.pruning import plan_pruning
    from gdws_torch.experiments.demo import INPUT_SHAPE, demo_network

    # The demo network's pairs: one channel of features.1.0 saves 32*9*256 + 64*9*64 =
    # 110,592 MACs, of features.2.0 64*9*64 + 128*9*64 = 110,592, of features.3.0
    # 64*9*64 + 128*9*16 = 55,296. With errors 1, 1.5 and 0.6 per channel the least error
    # per MAC saved is features.1.0's (0.6 is the least error, but saves half as much).
    model = demo_network()
    pairs = prunable_pairs(model)[1:]  # the stem's pair: not eligible (skip_first)
    assert [p.producer for p in pairs] == ["features.1.0", "features.2.0", "features.3.0"]
    widths = {"features.1.0": 64, "features.2.0": 64, "features.3.0": 128}
    per_channel = zip(widths.items(), (1.0, 1.5, 0.6), strict=True)
    errors = {name: torch.full((n,), e) for (name, n), e in per_channel}
    macs = count_macs(model, INPUT_SHAPE)
    involved = sum(macs[f"features.{i}.0"].macs for i in range(1, 5))
    keep = plan_pruning(model, pairs, errors, "reconstruction", macs, involved - 1)
    assert {name: len(kept) for name, kept in keep.items()} == {
        "features.1.0": 63,
        "features.2.0": 64,
        "features.3.0": 128,
    }
    keep = plan_pruning(model, pairs, errors, "reconstruction", macs, involved - 64 * 110_592)
    kept = {name: len(channels) for name, channels in keep.items()}
    assert kept == {"features.1.0": 1, "features.2.0": 64, "features.3.0": 126}


# -- the MAC target ----------------------------------------------------------------------


@pytest.mark.parametrize("target", [1.5, 2.0])
@pytest.mark.parametrize(
    ("method", "criterion", "network"),
    [
        ("dws", "weights", small_resnet),
        ("lowrank", "weights", small_resnet),
        ("lowrank", "responses", small_resnet),
        ("prune", "l1", tiny_resnet),
        ("prune", "reconstruction", tiny_resnet),
    ],
)
def test_each_method_reaches_the_mac_target(method, criterion, network, target):
    model = network()
    dense = count_macs(model, INPUT_SIZE).conv_macs
    compressed, report = compress_baseline(
        model,
        method,
        loader(),
        criterion=criterion,
        n_samples=N_SAMPLES,
        target_mac_reduction=target,
        input_size=INPUT_SIZE,
    )
    counted = count_macs(compressed, INPUT_SIZE)
    assert counted.conv_macs * target <= dense
    assert report.macs == counted.conv_macs and report.dense_macs == dense
    assert report.mac_reduction == pytest.approx(dense / counted.conv_macs)
    assert (report.method, report.criterion) == (method, criterion)
    if method == "lowrank" or criterion == "reconstruction":  # a rank or channel at a time
        assert report.mac_reduction < target * 1.05
    with torch.no_grad():
        assert compressed(inputs()).shape == (4, 5)
    json.dumps(report.to_dict())
    assert f"{report.mac_reduction:.3f}x fewer" in str(report)


def test_pruning_small_resnet_is_limited_by_its_one_prunable_conv():
    model = small_resnet()
    _, report = compress_baseline(model, "prune", target_mac_reduction=1.1, input_size=INPUT_SIZE)
    assert report.criterion == "l1"
    assert [layer.name for layer in report.layers] == ["block.conv1", "block.conv2"]
    with pytest.raises(ValueError, match=r"out of reach for 'prune'.* at most 1\.2\d\dx"):
        compress_baseline(model, "prune", target_mac_reduction=1.5, input_size=INPUT_SIZE)


# -- the least-squares refits against NumPy ----------------------------------------------


def _unfold_rows(conv: nn.Conv2d, x: torch.Tensor) -> np.ndarray:
    """Patches as rows ``(N*L, C*Kh*Kw)`` by F.unfold (zero padding only)."""
    patches = F.unfold(
        x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]).numpy()


def _responses(conv: nn.Conv2d, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).numpy()


@pytest.mark.parametrize("method", ["dws", "lowrank"])
def test_the_1x1_refit_matches_numpy_lstsq(method):
    model, batches = small_resnet(), loader()
    options = {"target_mac_reduction": 1.2, "input_size": INPUT_SIZE, "layers": ["dilated"]}
    options.update(criterion="weights", ridge=0.0)
    plain, _ = compress_baseline(model, method, batches, **options)
    refitted, report = compress_baseline(model, method, batches, refit=N_SAMPLES, **options)
    conv = model.dilated
    x = layer_input(plain, "dilated", all_images(batches))  # earlier layers are dense
    layer = plain.dilated
    with torch.no_grad():
        if method == "dws":
            features = layer.depthwise(x)
        else:
            features = F.conv2d(x, layer.first.weight, None, 1, 2, 2)
    z = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).numpy()
    expected = np.linalg.lstsq(z, _responses(conv, x), rcond=None)[0].T
    got = (refitted.dilated.pointwise if method == "dws" else refitted.dilated.second).weight
    np.testing.assert_allclose(got.detach().flatten(1).numpy(), expected, rtol=0, atol=1e-8)
    before, after = report.refit_errors["dilated"]
    assert after < before


def test_the_pruning_refit_matches_numpy_lstsq():
    model, batches = small_resnet(), loader()
    options = {"target_mac_reduction": 1.1, "input_size": INPUT_SIZE, "ridge": 0.0}
    options["n_samples"] = N_SAMPLES
    plain, _ = compress_baseline(model, "prune", batches, **options)
    refitted, report = compress_baseline(model, "prune", batches, refit=N_SAMPLES, **options)
    images = all_images(batches)
    consumer = model.block.conv2
    x_dense = layer_input(model, "block.conv2", images)
    x_pruned = layer_input(plain, "block.conv2", images)
    assert x_pruned.shape[1] < x_dense.shape[1]
    rows = _unfold_rows(plain.block.conv2, x_pruned)
    expected = np.linalg.lstsq(rows, _responses(consumer, x_dense), rcond=None)[0].T
    got = refitted.block.conv2.weight.detach().flatten(1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-8)
    before, after = report.refit_errors["block.conv2"]
    assert after < before


# -- what is left alone, what is refused -------------------------------------------------


@pytest.mark.parametrize(
    ("method", "network"),
    [("dws", small_resnet), ("lowrank", small_resnet), ("prune", tiny_resnet)],
)
def test_the_model_is_not_modified(method, network):
    model = network().train()
    (model.blocks[0].bn1 if method == "prune" else model.bn2).eval()  # mixed modes
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    compressed, report = compress_baseline(
        model,
        method,
        loader(),
        target_mac_reduction=1.5,
        input_size=INPUT_SIZE,
        n_samples=N_SAMPLES,
        refit=N_SAMPLES,
        recalibrate=N_SAMPLES,
    )
    assert report.refit_samples == report.recalibrate_samples == N_SAMPLES
    assert {"compression", "refit", "recalibration"} <= set(report.seconds)
    assert [m.training for m in model.modules()] == modes
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert compressed is not model and compressed.training


def test_bad_input_is_refused_with_a_clear_message():
    model = small_resnet()
    common = {"target_mac_reduction": 2.0, "input_size": INPUT_SIZE}
    with pytest.raises(ValueError, match=r"method must be one of \('dws', 'lowrank', 'prune'\)"):
        compress_baseline(model, "svd", **common)
    with pytest.raises(ValueError, match="target_mac_reduction must be"):
        compress_baseline(model, "dws", target_mac_reduction=0.5, input_size=INPUT_SIZE)
    with pytest.raises(ValueError, match="target_mac_reduction must be"):
        compress_baseline(model, "dws", target_mac_reduction=1, input_size=INPUT_SIZE)
    with pytest.raises(TypeError, match="target_mac_reduction"):
        compress_baseline(model, "dws", target_mac_reduction="2", input_size=INPUT_SIZE)
    with pytest.raises(ValueError, match=r"criterion for 'dws' must be one of \('weights',\)"):
        compress_baseline(model, "dws", criterion="l1", **common)
    with pytest.raises(ValueError, match="refit needs calibration data"):
        compress_baseline(model, "lowrank", refit=8, **common)
    with pytest.raises(ValueError, match="criterion 'responses' needs calibration data"):
        compress_baseline(model, "lowrank", criterion="responses", **common)
    with pytest.raises(ValueError, match=r"out of reach for 'lowrank'.* at most \d"):
        compress_baseline(model, "lowrank", target_mac_reduction=50, input_size=INPUT_SIZE)
    with pytest.raises(ValueError, match="refit must be an integer >= 0"):
        compress_baseline(model, "dws", loader(), refit=-1, **common)
    with pytest.raises(ValueError, match="no eligible convolution"):
        compress_baseline(NoEligible(), "dws", **common)
    with pytest.raises(ValueError, match="no prunable convolution"):
        compress_baseline(model, "prune", layers=["dilated"], **common)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        compress_baseline("model", "dws", **common)
    with pytest.raises(ValueError, match="keep names convs that cannot be pruned"):
        prune_channels(model, {"dilated": [0]})
    with pytest.raises(ValueError, match="distinct channels"):
        prune_channels(model, {"block.conv1": [0, 0]})


class _Untraceable(TinyResNet):
    def forward(self, x):
        if float(x.sum()) > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1
        return super().forward(x)


def test_pruning_an_untraceable_model_says_why():
    with pytest.raises(ValueError, match="cannot be traced"):
        compress_baseline(
            _Untraceable().double().eval(),
            "prune",
            target_mac_reduction=1.5,
            input_size=INPUT_SIZE,
        )


def test_interleaved_input_captures_leave_grad_mode_alone():
    from gdws_torch.baselines.common import capture_inputs

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    batches = [torch.rand(2, 3, 8, 8) for _ in range(3)]
    pairs = zip(  # as the pruning refit reads the dense and the pruned model together
        capture_inputs(model, model[0], batches),
        capture_inputs(other, other[2], batches),
        strict=True,
    )
    for first, second in pairs:
        assert first.shape == (2, 3, 8, 8) and second.shape == (2, 4, 6, 6)
    assert torch.is_grad_enabled()
