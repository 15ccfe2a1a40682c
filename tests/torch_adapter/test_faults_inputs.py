"""Bad input is refused with a clear error, before any long work, never a wrong number."""

from __future__ import annotations

import pickle

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
    PGD,
    PGDL1,
    PGDL2,
    convert,
    load_alphas,
    load_checkpoint,
    load_converted,
    load_state_dict_file,
    save_converted,
)
from gdws_torch.conversion.options import Weighting
from gdws_torch.io import checkpoints
from gdws_torch.io.datasets import load_dataset
from gdws_torch.io.imagefolder import imagefolder_loader
from gdws_torch.robustness.evaluate import evaluate
from gdws_torch.robustness.training import train

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
    "alphas": load_alphas,
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
        load_alphas(tmp_path / "alphas.pth")


def test_complex_alphas_are_refused_by_convert_and_the_estimator():
    model = small_resnet().float()
    alphas = {
        name: torch.ones(c.in_channels)
        for name, c in model.named_modules()
        if isinstance(c, nn.Conv2d)
    }
    alphas["dilated"] = torch.ones(24) + 1j
    with pytest.raises(TypeError, match=r"alphas\['dilated'\] must hold real numbers"):
        convert(model, input_size=INPUT_SIZE, weighting=Weighting(alphas=alphas))
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
