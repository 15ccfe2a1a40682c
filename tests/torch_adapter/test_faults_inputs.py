"""Bad input is refused with a clear error, before any long work, never a wrong number."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import operator
import pickle
import re

import numpy as np
import pytest
import torch
from _torch_models import INPUT_SIZE, small_resnet
from PIL import Image
from scipy.io import savemat
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gdws_approx import GDWSApproximator, channel_spectra, mego_multipliers, plan_network
from gdws_approx.planning import LayerSpec
from gdws_torch import (
    APGD,
    APGDT,
    FAB,
    PGD,
    PGDL1,
    PGDL2,
    RECIPES,
    AutoAttack,
    BatchNormStatistics,
    ErrorWeights,
    GDWSConv2d,
    Recovery,
    Refit,
    Square,
    check_gradient_masking,
    compress,
    compress_baseline,
    convert,
    load_channel_weights,
    load_checkpoint,
    load_converted,
    load_state_dict_file,
    noise_gains,
    pad_kernels,
    recalibrate_batchnorm,
    recover,
    replace_module,
    save_converted,
)
from gdws_torch.baselines.lowrank import LowRankConv2d
from gdws_torch.conversion.options import Weighting
from gdws_torch.io import checkpoints
from gdws_torch.io.datasets import load_dataset
from gdws_torch.io.imagefolder import imagefolder_loader
from gdws_torch.nn.normalization import normalized
from gdws_torch.robustness.evaluate import evaluate, evaluate_dataset
from gdws_torch.robustness.training import accuracy, train

# -- dataset files ------------------------------------------------------------------------


def write_cifar(root, labels, hundred=False, data=None):
    """A CIFAR test file (the python pickles) holding ``labels``."""
    n = len(labels)
    if data is None:
        data = np.random.default_rng(0).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    if hundred:
        folder, name, key = root / "cifar-100-python", "test", b"fine_labels"
    else:
        folder, name, key = root / "cifar-10-batches-py", "test_batch", b"labels"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps({b"data": data, key: labels}, protocol=2))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([1, 0.5, 2], r"test_batch.*label 0\.5 \(at index 1\) is not an integer"),
        ([1, 10, 2], r"test_batch.*label 10 \(at index 1\) is outside 0\.\.9"),
        ([-1, 0, 2], r"test_batch.*label -1 \(at index 0\) is outside 0\.\.9"),
        ([1, float("nan"), 2], r"test_batch.*label nan \(at index 1\) is not an integer"),
    ],
)
def test_cifar10_labels_must_be_integers_in_range(tmp_path, labels, message):
    write_cifar(tmp_path, labels)
    with pytest.raises(ValueError, match=message):
        load_dataset("cifar10", tmp_path)


def test_cifar100_label_100_is_refused(tmp_path):
    write_cifar(tmp_path, [5, 100, 0], hundred=True)
    with pytest.raises(ValueError, match=r"CIFAR-100: .*test.*label 100 .* outside 0\.\.99"):
        load_dataset("cifar100", tmp_path)


def test_cifar_labels_and_images_must_match_in_number(tmp_path):
    data = np.zeros((3, 3072), np.uint8)
    write_cifar(tmp_path, [0, 1], data=data)
    with pytest.raises(ValueError, match=r"test_batch' has 3 images but 2 labels"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize(
    ("y", "message"),
    [
        (
            np.array([[1], [11], [3]], np.uint8),
            r"test_32x32\.mat' \(y\): label 11 .* outside 1\.\.10",
        ),
        (
            np.array([[1], [0], [3]], np.uint8),
            r"test_32x32\.mat' \(y\): label 0 .* outside 1\.\.10",
        ),
        (np.array([[1.0], [2.5], [3.0]]), r"test_32x32\.mat' \(y\): label 2\.5 .* not an integer"),
    ],
)
def test_svhn_labels_must_be_integers_from_1_to_10(tmp_path, y, message):
    X = np.zeros((32, 32, 3, 3), np.uint8)
    savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    with pytest.raises(ValueError, match=message):
        load_dataset("svhn", tmp_path)


def test_svhn_pixels_must_be_uint8(tmp_path):
    X = np.full((32, 32, 3, 2), 300.0)  # would wrap to 44 as uint8
    savemat(tmp_path / "test_32x32.mat", {"X": X, "y": np.array([[1], [2]], np.uint8)})
    with pytest.raises(ValueError, match=r"test_32x32\.mat' has X of dtype float64.*uint8"):
        load_dataset("svhn", tmp_path)


# -- checkpoints with NaN or inf ----------------------------------------------------------


def poisoned_state(model: nn.Module, value: float = float("nan")) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["stem.weight"][0, 0, 0, 0] = value
    return state


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, value):
    path = tmp_path / "diverged.pth"
    torch.save({"state_dict": poisoned_state(small_resnet().float(), value)}, path)
    model = small_resnet(seed=1).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"diverged\.pth' holds NaN or inf .*'stem\.weight'"):
        load_checkpoint(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"diverged\.pth' holds NaN or inf"):
        load_state_dict_file(path)


def test_check_state_dict_and_check_finite_state_name_the_source():
    model = small_resnet().float()
    with pytest.raises(ValueError, match=r"^'run/x\.pth' holds NaN or inf values in 1 tensor"):
        checkpoints.check_state_dict(model, poisoned_state(model), "'run/x.pth'")
    checkpoints.check_finite_state({"count": torch.tensor(3), "w": torch.ones(2)}, "ok")


def test_a_converted_model_with_non_finite_weights_is_refused(tmp_path):
    converted, _ = convert(
        small_resnet().float(), input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False
    )
    with torch.no_grad():
        converted.block.conv2.pointwise.weight[0, 0] = float("nan")
    save_converted(tmp_path / "converted.pth", converted)
    with pytest.raises(ValueError, match=r"converted\.pth' holds NaN or inf .*pointwise"):
        load_converted(tmp_path / "converted.pth", small_resnet().float())


# -- files that are not torch files -------------------------------------------------------


JUNK = {
    "empty": (b"", r"is not a torch checkpoint \(empty file\)"),
    "random": (
        np.random.default_rng(0).bytes(3000),
        r"is not a torch checkpoint \(not a zip or pickle file",
    ),
    "text": (b"epoch 3: loss 0.42\n", r"is not a torch checkpoint \(not a zip or pickle file"),
}
LOADERS = {
    "checkpoint": lambda path: load_checkpoint(small_resnet().float(), path),
    "state_dict": load_state_dict_file,
    "alphas": load_channel_weights,
    "converted": lambda path: load_converted(path, small_resnet().float()),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("junk", sorted(JUNK))
def test_junk_files_are_not_torch_checkpoints(tmp_path, loader, junk):
    content, message = JUNK[junk]
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"model\.pth' " + message):
        LOADERS[loader](path)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_directory_is_not_a_checkpoint(tmp_path, loader):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"run' is a directory, not a torch checkpoint file"):
        LOADERS[loader](tmp_path / "run")


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_real_unsafe_pickle_keeps_its_message(tmp_path, capsys):
    torch.save({"state_dict": {"w": Payload()}}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="needs arbitrary unpickling"):
        load_state_dict_file(tmp_path / "unsafe.pth")
    assert "pwned" not in capsys.readouterr().out


# -- complex noise gains ------------------------------------------------------------------


def test_complex_noise_gains_in_a_file_are_refused(tmp_path):
    gains = {"block.conv1.weight": torch.ones(8, dtype=torch.complex64)}
    torch.save({"noise_gains": gains}, tmp_path / "alphas.pth")
    with pytest.raises(
        ValueError,
        match=r"alphas\.pth': noise_gains\['block\.conv1\.weight'\] must hold real numbers; "
        r"got dtype torch\.complex64",
    ):
        load_channel_weights(tmp_path / "alphas.pth")


def test_complex_alphas_are_refused_by_convert_and_the_estimator():
    model = small_resnet().float()
    alphas = {
        name: torch.ones(c.in_channels)
        for name, c in model.named_modules()
        if isinstance(c, nn.Conv2d)
    }
    alphas["dilated"] = torch.ones(24) + 1j
    with pytest.raises(TypeError, match=r"channel_weights\['dilated'\] must hold real numbers"):
        convert(model, input_size=INPUT_SIZE, error_weights=ErrorWeights(alphas))
    W = np.random.default_rng(0).standard_normal((8, 4, 3, 3))
    with pytest.raises(TypeError, match=r"alpha must hold real numbers; got dtype complex128"):
        GDWSApproximator().fit(W, alpha=np.ones(4) + 1j)


# -- weights too large for their precision ------------------------------------------------


@pytest.mark.parametrize("svd_solver", ["auto", "full", "covariance_eigh"])
def test_float64_weights_of_magnitude_1e160_are_refused(svd_solver):
    W = np.random.default_rng(0).standard_normal((8, 4, 3, 3))
    W[:, 0] *= 1e160
    copy = W.copy()
    with pytest.raises(ValueError, match=r"W has values too large.*Scale the weights first"):
        GDWSApproximator(solver="mego", n_kernels=6, svd_solver=svd_solver).fit(W)
    np.testing.assert_array_equal(W, copy)


def test_float32_weights_whose_squares_overflow_float32_are_refused():
    W = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
    W[:, 1] *= 1e20
    with pytest.raises(ValueError, match=r"W has values too large.*overflow float32"):
        GDWSApproximator(solver="mego", n_kernels=6).fit(W)


def test_planning_spectra_and_solvers_refuse_overflowing_values():
    W = np.random.default_rng(0).standard_normal((8, 4, 3, 3)) * 1e160
    with pytest.raises(ValueError, match=r"layer 'conv': W has values too large"):
        plan_network([LayerSpec("conv", W, 16)], target_mac_reduction=1.5)
    with pytest.raises(ValueError, match=r"W3 has values too large"):
        channel_spectra(W.reshape(8, 4, 9))
    with pytest.raises(ValueError, match=r"values contains NaN or inf"):
        mego_multipliers(np.array([[np.inf, 1.0], [2.0, 1.0]]), 2)


# -- attacks and evaluation: labels and steps ---------------------------------------------


@pytest.fixture(scope="module")
def classifier():
    model = small_resnet(n_classes=5).float().eval()
    x = torch.rand(4, *INPUT_SIZE, generator=torch.Generator().manual_seed(0))
    return model, x


@pytest.mark.parametrize("attack_class", [PGD, PGDL2, PGDL1])
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 1, 5, 2], r"labels must be class indices in \[0, 5\) .*got 5"),
        ([0, -1, 3, 2], r"labels must be class indices >= 0; got -1"),
    ],
)
def test_attacks_refuse_labels_outside_the_classes(classifier, attack_class, labels, message):
    model, x = classifier
    attack = attack_class(model, eps=0.1, alpha=0.02, steps=2)
    with pytest.raises(ValueError, match=message):
        attack(x, torch.tensor(labels))


@pytest.mark.parametrize("attack_class", [PGD, PGDL2, PGDL1])
def test_attacks_need_at_least_one_step(classifier, attack_class):
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1; got 0"):
        attack_class(classifier[0], eps=0.1, alpha=0.02, steps=0)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 1, 7, 2]), r"labels must be class indices in \[0, 5\) .*got 7"),
        (torch.tensor([0.0, 0.5, 1.0, 2.0]), r"labels must be integer class indices; got 0\.5"),
    ],
)
def test_evaluate_refuses_labels_outside_the_classes(classifier, labels, message):
    model, x = classifier
    with pytest.raises(ValueError, match=message):
        evaluate(model, [(x, labels)], progress=False)


# -- training that diverges ---------------------------------------------------------------


def test_training_with_a_huge_learning_rate_stops_at_the_first_non_finite_loss():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 4, 4)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(
        FloatingPointError,
        match=r"^training diverged: the loss became (nan|inf) at epoch 1, batch \d+; lower the "
        r"learning rate \(lr=1000000\.0\)\.$",
    ):
        train(model, loader, epochs=2, lr=1e6, progress=False)


# -- ONNX: memory, kernel_multiple and the report -----------------------------------------


def conv_model(dynamic: bool = True):
    """Two 3x3 convs (3 -> 5 -> 6), the input's height and width dynamic."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((6, 5, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], name="first", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="second", pads=[1, 1, 1, 1]),
    ]
    dims = ["batch", 3, "height", "width"] if dynamic else ["batch", 3, 8, 8]
    graph = helper.make_graph(
        nodes,
        "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 6, *dims[2:]])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


HUGE = (3, 1_000_000, 1_000_000)  # 12 TB for the input alone


def test_onnx_rewrite_and_check_refuse_an_input_shape_too_big_for_memory():
    gdws_onnx = pytest.importorskip("gdws_onnx")
    pytest.importorskip("onnxruntime")
    model = conv_model()
    message = r"input_shape \(3, 1000000, 1000000\) needs about [\d.e+]+ GiB .* more than the"
    with pytest.raises(ValueError, match=message):
        gdws_onnx.rewrite(model, input_shape=HUGE)
    with pytest.raises(ValueError, match=message):
        gdws_onnx.check(model, model, input_shape=HUGE)


@pytest.mark.parametrize(
    ("multiple", "error", "message"),
    [
        (1_000_000, ValueError, r"kernel_multiple must be an integer from 1 .* to 64; got 1000000"),
        (0, ValueError, r"kernel_multiple must be an integer from 1 .* to 64; got 0"),
        (2.0, TypeError, r"kernel_multiple must be an integer; got 2\.0 \(float\)"),
    ],
)
def test_kernel_multiple_is_bounded_in_rewrite_and_export(tmp_path, multiple, error, message):
    gdws_onnx = pytest.importorskip("gdws_onnx")
    with pytest.raises(error, match=message):
        gdws_onnx.rewrite(conv_model(dynamic=False), kernel_multiple=multiple)
    with pytest.raises(error, match=message):
        gdws_onnx.export(
            small_resnet().float(), tmp_path / "m.onnx", INPUT_SIZE, kernel_multiple=multiple
        )
    assert not (tmp_path / "m.onnx").exists()


def test_the_rewrite_report_records_the_padding():
    gdws_onnx = pytest.importorskip("gdws_onnx")
    _, plan = gdws_onnx.rewrite(
        conv_model(dynamic=False),
        beta=0.0,
        only_if_cheaper=False,
        skip_first=False,
        kernel_multiple=4,
    )
    report = plan.to_dict()
    assert report["kernel_multiple"] == 4
    first, second = report["layers"]
    assert (first["n_kernels"], first["padded_n_kernels"]) == (15, 16)
    assert (second["n_kernels"], second["padded_n_kernels"]) == (30, 32)
    extra = 1 * (9 + 5) * 64 + 2 * (9 + 6) * 64  # zero kernels x (K2 + M) x 8*8 pixels
    assert second["padded_macs"] == second["macs"] + 2 * (9 + 6) * 64
    assert report["padded_macs"] == report["macs"] + extra
    table = plan.format_table()
    assert "15->16" in table and "30->32" in table and "MACs padded" in table
    footer = "G padded to a multiple of 4 when deployed (zero kernels, same outputs): "
    assert f"{footer}{report['padded_macs']:,} MACs" in table


# -- a corrupt image in a worker process --------------------------------------------------


def test_a_corrupt_jpeg_read_by_a_worker_names_the_file(tmp_path):
    folder = tmp_path / "n01"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "good.JPEG")
    (folder / "corrupt.JPEG").write_bytes(np.random.default_rng(1).bytes(5000))
    loader = imagefolder_loader(tmp_path, batch_size=1, num_workers=2, resize=32, crop=32)
    with pytest.raises(ValueError, match=r"cannot decode the image '.*n01/corrupt\.JPEG'"):
        list(loader)


# -- non-finite data, refused where it enters ---------------------------------------------


def data_loader(value=None, batch=2, sample=4, n=16, size=8):
    """``n`` (images, labels) samples in batches of ``size``; ``value`` (NaN or inf) put in
    one pixel of ``sample`` of ``batch`` (both counted from 1)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, *INPUT_SIZE, generator=generator)
    y = torch.randint(0, 5, (n,), generator=generator)
    if value is not None:
        x[(batch - 1) * size + sample - 1, 1, 3, 5] = value
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def small_recipe(**changes):
    base = RECIPES["robust"].replace(
        weighting=Weighting("data", samples=16),
        recovery=Recovery(
            refit=Refit(samples=16, adversarial=False), batchnorm=BatchNormStatistics(16)
        ),
    )
    return base.replace(**changes)


def converted(model):
    return convert(model, input_size=INPUT_SIZE, beta=0.5)[0]


# Every stage that reads a loader: (stage named in the message, the call on a loader).
STAGES = {
    "recalibrate_batchnorm": (
        "BatchNorm re-estimation",
        lambda model, data: recalibrate_batchnorm(model, data, 16, progress=False),
    ),
    "recover(Recovery(batchnorm))": (
        "BatchNorm re-estimation",
        lambda model, data: recover(
            converted(model), model, Recovery(batchnorm=BatchNormStatistics(16)), data=data
        ),
    ),
    "recover(Recovery(refit))": (
        "refit",
        lambda model, data: recover(
            converted(model), model, Recovery(refit=Refit(16)), calibration=data
        ),
    ),
    "compress (data weighting)": (
        "data weighting",
        lambda model, data: compress(
            model, data, beta=0.5, recipe=small_recipe(), input_size=INPUT_SIZE
        ),
    ),
    "compress (calibration)": (
        "calibration",
        lambda model, data: compress(
            model,
            data,
            beta=0.5,
            recipe=small_recipe(weighting=Weighting("unit")),
            input_size=INPUT_SIZE,
        ),
    ),
    "noise_gains": (
        "noise gains",
        lambda model, data: noise_gains(model, data, 16, progress=False),
    ),
    "compress_baseline(recalibrate)": (
        "BatchNorm re-estimation",
        lambda model, data: compress_baseline(
            model,
            "dws",
            data,
            target_mac_reduction=1.5,
            input_size=INPUT_SIZE,
            recalibrate=16,
        ),
    ),
    "compress_baseline(refit)": (
        "refit",
        lambda model, data: compress_baseline(
            model,
            "prune",
            data,
            criterion="l1",
            target_mac_reduction=1.2,
            input_size=INPUT_SIZE,
            refit=16,
        ),
    ),
    "compress_baseline lowrank": (
        "baseline criterion",
        lambda model, data: compress_baseline(
            model, "lowrank", data, target_mac_reduction=1.5, input_size=INPUT_SIZE, n_samples=16
        ),
    ),
    "compress_baseline prune": (
        "baseline criterion",
        lambda model, data: compress_baseline(
            model, "prune", data, target_mac_reduction=1.2, input_size=INPUT_SIZE, n_samples=16
        ),
    ),
    "evaluate": ("evaluation", lambda model, data: evaluate(model, data, progress=False)),
    "evaluate_dataset": (
        "evaluation",
        lambda model, data: evaluate_dataset(
            model,
            TensorDataset(torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])),
            batch_size=8,
            progress=False,
        ),
    ),
    "accuracy": ("accuracy", lambda model, data: accuracy(model, data)),
    "train": ("training", lambda model, data: train(model, data, epochs=1, progress=False)),
}


@pytest.mark.parametrize("case", sorted(STAGES))
def test_a_nan_pixel_is_refused_where_it_enters_naming_the_stage_and_the_batch(case):
    stage, call = STAGES[case]
    model = small_resnet().float()
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(stage)}: the loader's batch 2, sample 4 \(both counted from 1\) "
        r"holds nan; every input must be a finite number",
    ):
        call(model, data_loader(float("nan")))


@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_an_infinite_pixel_is_refused_too(value):
    stage, call = STAGES["compress (data weighting)"]
    with pytest.raises(ValueError, match=rf"^{stage}: the loader's batch 1, sample 2 .* {value}"):
        call(small_resnet().float(), data_loader(value, batch=1, sample=2))


@pytest.mark.parametrize("case", ["recalibrate_batchnorm", "train"])
def test_nothing_is_updated_from_a_batch_with_a_nan(case):
    _, call = STAGES[case]
    model = small_resnet().float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inplace = {"recalibrate_batchnorm": {"inplace": True}}.get(case, {})
    data = data_loader(float("nan"), batch=1)
    with pytest.raises(ValueError, match="holds nan"):
        if inplace:
            recalibrate_batchnorm(model, data, 16, progress=False, **inplace)
        else:
            call(model, data)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_nan_in_samples_past_n_samples_is_never_read():
    model = small_resnet().float()
    data = data_loader(float("nan"), batch=2)  # samples 9..16; only the first 8 are read
    recalibrated = recalibrate_batchnorm(model, data, 8, progress=False)
    assert all(bool(torch.isfinite(v).all()) for v in recalibrated.state_dict().values())
    assert evaluate(model, data, n_samples=8, progress=False)["n_samples"] == 8


@pytest.mark.parametrize(
    "case", ["recalibrate_batchnorm", "evaluate", "compress_baseline lowrank", "accuracy"]
)
def test_a_loader_of_dicts_is_refused_saying_what_a_batch_must_be(case):
    stage, call = STAGES[case]
    data = [{"image": x, "label": y} for x, y in data_loader()]
    with pytest.raises(
        TypeError,
        match=rf"^{re.escape(stage)}: the loader must yield a tensor of images or an "
        r"\(images, labels, \.\.\.\) tuple or list of tensors; batch 1 is a dict\. For a "
        r"loader of dicts, pass e\.g\. \(\(b\['image'\], b\['label'\]\) for b in loader\)",
    ):
        call(small_resnet().float(), data)


def test_a_batch_whose_first_element_is_not_a_tensor_is_refused():
    with pytest.raises(TypeError, match=r"batch 1 is a tuple whose first element is a str"):
        evaluate(small_resnet().float(), [("cat.png", torch.tensor([0]))], progress=False)
    with pytest.raises(TypeError, match=r"batch 1 is an empty list"):
        recalibrate_batchnorm(small_resnet().float(), [[]], 4, progress=False)


# -- attacks: eps in pixel units, dtype, inference mode ------------------------------------


def every_attack(model, norm="Linf", eps=0.1):
    """One of each attack of the library for ``norm`` (cheap settings), by name."""
    attacks = {
        "PGD": lambda: PGD(model, eps=eps, alpha=eps / 4, steps=2, norm=norm),
        "APGD": lambda: APGD(model, norm=norm, eps=eps, steps=2),
        "APGDT": lambda: APGDT(model, norm=norm, eps=eps, steps=2, n_target_classes=2),
        "AutoAttack": lambda: AutoAttack(
            model, norm=norm, eps=eps, version="custom", attacks=["apgd-ce"], steps=2
        ),
    }
    if norm != "Linf":
        named = {"L2": PGDL2, "L1": PGDL1}[norm]
        attacks[named.__name__] = lambda: named(model, eps=eps, alpha=eps / 4, steps=2)
    if norm != "L1":
        attacks["FAB"] = lambda: FAB(model, norm=norm, eps=eps, steps=2, n_target_classes=2)
        attacks["Square"] = lambda: Square(model, norm=norm, eps=eps, n_queries=3)
    return attacks


@pytest.mark.parametrize("name", sorted(every_attack(None)))
def test_an_l_inf_eps_above_1_is_refused_as_compress_refuses_it(classifier, name):
    model, _ = classifier
    with pytest.raises(ValueError) as expected:
        compress(model, [], beta=0.5, eps=8, input_size=INPUT_SIZE)
    with pytest.raises(ValueError, match=r"^eps must be .* <= 1 \(pixel units\); got 8\.$") as got:
        every_attack(model, "Linf", eps=8)[name]()
    assert str(got.value) == str(expected.value)
    every_attack(model, "Linf", eps=1.0)[name]()  # the whole box: allowed


L2_L1_ATTACKS = [(norm, name) for norm in ("L2", "L1") for name in sorted(every_attack(None, norm))]


@pytest.mark.parametrize(("norm", "name"), L2_L1_ATTACKS)
def test_l_2_and_l_1_radii_above_1_within_the_box_run(classifier, norm, name):
    model, x = classifier  # 3x16x16 images: L2 diameter sqrt(768) = 27.7, L1 768
    eps = {"L2": 20.0, "L1": 12.0}[norm]
    adversarial = every_attack(model, norm, eps)[name]()(x, torch.tensor([0, 1, 2, 3]))
    p = {"L2": 2, "L1": 1}[norm]
    assert float((adversarial - x).flatten(1).norm(p=p, dim=1).max()) <= eps * (1 + 1e-5)


@pytest.mark.parametrize(("norm", "name"), L2_L1_ATTACKS)
def test_l_2_and_l_1_radii_beyond_the_pixel_box_are_refused_at_the_call(classifier, norm, name):
    model, x = classifier
    eps, diameter = {"L2": (128.0, "27.71"), "L1": (3060.0, "768")}[norm]  # 0.5, 12 x 255
    attack = every_attack(model, norm, eps)[name]()  # the bound needs the image size
    with pytest.raises(
        ValueError,
        match=rf"eps must be at most the {norm} diameter of the pixel box \[0, 1\] for "
        rf"images of shape \(3, 16, 16\) \({diameter}: .* got {eps:g}\. eps is in pixel "
        r"units, not 1/255 units\.",
    ):
        attack(x, torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("name", sorted(every_attack(None)))
def test_attacks_refuse_images_of_another_dtype_than_the_model(classifier, name):
    model, x = classifier
    with pytest.raises(
        TypeError,
        match=r"^images have dtype torch\.float64 but the model's parameters are "
        r"torch\.float32: convert the images \(images\.to\(torch\.float32\)\) or the model\.$",
    ):
        every_attack(model)[name]()(x.double(), torch.tensor([0, 1, 2, 3]))


def test_evaluate_refuses_images_of_another_dtype_than_the_model(classifier):
    model, x = classifier
    with pytest.raises(TypeError, match=r"images have dtype torch\.float64 .* torch\.float32"):
        evaluate(model, [(x.double(), torch.tensor([0, 1, 2, 3]))], progress=False)


@pytest.mark.parametrize("name", sorted(set(every_attack(None)) - {"Square"}))
def test_attacks_that_take_gradients_refuse_inference_mode(classifier, name):
    model, x = classifier
    attack = every_attack(model)[name]()
    with (
        pytest.raises(
            RuntimeError,
            match=rf"^{name.split()[0]} needs autograd .* call {name.split()[0]} outside "
            r"torch\.inference_mode\(\) \(torch\.no_grad\(\) is fine\)\.$",
        ),
        torch.inference_mode(),
    ):
        attack(x, torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("name", sorted(every_attack(None)))
def test_attacks_take_tensors_made_under_inference_mode_and_run_under_no_grad(classifier, name):
    model, x = classifier
    labels = torch.tensor([0, 1, 2, 3])
    expected = every_attack(model)[name]()(x, labels)
    with torch.inference_mode():
        frozen_x, frozen_labels = x.clone(), labels.clone()
    assert torch.equal(every_attack(model)[name]()(frozen_x, frozen_labels), expected)
    with torch.no_grad():
        assert torch.equal(every_attack(model)[name]()(x, labels), expected)


def test_the_gradient_masking_checks_refuse_inference_mode_and_another_dtype(classifier):
    model, x = classifier
    labels = torch.tensor([0, 1, 2, 3])
    with (
        pytest.raises(RuntimeError, match=r"^check_gradient_masking needs autograd .* outside"),
        torch.inference_mode(),
    ):
        check_gradient_masking(model, x, labels)
    with pytest.raises(TypeError, match=r"images have dtype torch\.float64 .* torch\.float32"):
        check_gradient_masking(model, x.double(), labels)
    with torch.inference_mode():
        frozen = x.clone()
    assert check_gradient_masking(model, frozen, labels).to_dict() == (
        check_gradient_masking(model, x, labels).to_dict()
    )


def test_square_a_black_box_attack_runs_under_inference_mode(classifier):
    model, x = classifier
    labels = torch.tensor([0, 1, 2, 3])
    expected = Square(model, eps=0.1, n_queries=3)(x, labels)
    with torch.inference_mode():
        assert torch.equal(Square(model, eps=0.1, n_queries=3)(x, labels), expected)


# -- every model the library builds pickles ------------------------------------------------


def grouped(model: nn.Module) -> nn.Module:
    """``model`` with every GDWS layer in its grouped form (no gather)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GDWSConv2d):
            replace_module(model, name, module.uniform())
    return model


def built_models(tmp_path):
    """Every kind of model the library builds, from the small ResNet, by name."""
    dense = small_resnet().float()

    def converted(**options):
        return convert(dense, input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False, **options)[0]

    def baseline(method):
        return compress_baseline(dense, method, target_mac_reduction=1.2, input_size=INPUT_SIZE)[0]

    def reloaded():
        save_converted(tmp_path / "converted.pth", converted())
        return load_converted(tmp_path / "converted.pth", small_resnet().float())[0]

    return {
        "convert (gather)": converted,
        "convert (fused)": lambda: converted(fused=True),
        "convert (grouped)": lambda: grouped(converted()),
        "convert (padded)": lambda: pad_kernels(converted(), 4),
        "recover (BatchNorm)": lambda: recover(
            converted(), dense, Recovery(batchnorm=BatchNormStatistics(16)), data=data_loader()
        )[0],
        "compress": lambda: compress(dense, beta=0.5, recipe="unit", input_size=INPUT_SIZE)[0],
        "load_converted": reloaded,
        "baseline dws": lambda: baseline("dws"),
        "baseline lowrank": lambda: baseline("lowrank"),
        "baseline prune": lambda: baseline("prune"),
        "normalized": lambda: normalized(converted(), "cifar10"),
        "GDWSConv2d": lambda: converted().dilated,
        "LowRankConv2d": lambda: next(
            m for m in baseline("lowrank").modules() if isinstance(m, LowRankConv2d)
        ),
    }


def model_input(model: nn.Module) -> torch.Tensor:
    if isinstance(model, LowRankConv2d):
        channels = model.first.in_channels
    else:
        channels = model.in_channels if isinstance(model, GDWSConv2d) else 3
    return torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", sorted(built_models(None)))
def test_every_model_the_library_builds_pickles_and_reloads_bit_identical(tmp_path, kind):
    model = built_models(tmp_path)[kind]().eval()
    built = {type(m) for m in model.modules()}
    if kind in ("baseline lowrank", "LowRankConv2d"):
        assert LowRankConv2d in built
    elif not kind.startswith("baseline"):
        assert GDWSConv2d in built
    x = model_input(model)
    with torch.no_grad():
        expected = model(x)
    torch.save(model, tmp_path / "model.pt")
    copies = [
        torch.load(tmp_path / "model.pt", weights_only=False),
        pickle.loads(pickle.dumps(model)),
    ]
    for copy in copies:
        assert type(copy) is type(model)
        with torch.no_grad():
            assert torch.equal(copy.eval()(x), expected)
        # The state-dict round trip still works on the reloaded model.
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(copy(x), expected)


def test_a_reloaded_gdws_layer_still_notes_a_loaded_kernel_order():
    layer = GDWSConv2d(4, 6, 3, [0, 1, 2, 3], padding=1)
    assert not layer.gathers  # one kernel per channel, in order: no gather
    copy = pickle.loads(pickle.dumps(layer))
    state = layer.state_dict()
    state["kernel_channels"] = torch.tensor([1, 0, 2, 3])
    copy.load_state_dict(state)
    assert copy.gathers  # recomputed from the loaded buffer


def test_a_converted_model_crosses_to_a_spawned_process():
    dense = small_resnet().float()
    model, _ = convert(dense, input_size=INPUT_SIZE, beta=0.5, only_if_cheaper=False)
    model.eval().requires_grad_(False)  # so that the child's output can cross back
    x = model_input(model)
    expected = model(x)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        assert torch.equal(pool.submit(operator.call, model, x).result(timeout=120), expected)
