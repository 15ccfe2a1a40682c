"""ImageNet-scale inputs: the image-folder loader, its transform, ResNet-50, checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _torch_models import with_batchnorm_statistics
from PIL import Image

from gdws_torch.cli import _common as common
from gdws_torch.cli import main
from gdws_torch.io.checkpoints import check_state_dict, load_checkpoint, load_state_dict_file
from gdws_torch.io.datasets import DATASETS, load_dataset, num_classes
from gdws_torch.io.imagefolder import (
    ImageFolder,
    center_crop,
    eval_transform,
    imagefolder_loader,
    resize_shorter_side,
)
from gdws_torch.models import ARCHITECTURES, ResNet50
from gdws_torch.nn.normalization import DATASET_NORMALIZATION, normalized

# (class folder, file name, (width, height), Pillow mode)
IMAGES = [
    ("n01", "a.JPEG", (300, 260), "RGB"),
    ("n01", "b.png", (260, 300), "L"),
    ("n01", "sub/c.jpg", (224, 224), "RGB"),
    ("n02", "A.PNG", (400, 257), "RGBA"),
    ("n02", "b.bmp", (256, 256), "RGB"),
    ("n03", "x.jpeg", (225, 500), "RGB"),
    ("n03", "y.webp", (640, 480), "RGB"),
    ("n03", "z.png", (500, 300), "P"),
]


def _write(path, size, mode, seed):
    rng = np.random.default_rng(seed)
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "P": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(
        pixels[..., 0] if channels == 1 else pixels, "L" if mode == "P" else mode
    )
    if mode == "P":
        image = image.convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    for seed, (label, name, size, mode) in enumerate(IMAGES):
        _write(root / label / name, size, mode, seed)
    (root / "n02" / "notes.txt").write_text("not an image")
    (root / "readme.md").write_text("a file beside the class folders is not a class")
    return root


def reference(path, resize=256, crop=224):
    """torchvision's Resize(256), CenterCrop(224), ToTensor() on a PIL image, re-derived."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        size = (resize, int(resize * h / w))
    else:
        size = (int(resize * w / h), resize)
    if min(w, h) != resize:
        image = image.resize(size, Image.BILINEAR)
    pixels = np.asarray(image)
    top = round((pixels.shape[0] - crop) / 2.0)  # round half to even, as int(round(..))
    left = round((pixels.shape[1] - crop) / 2.0)
    pixels = pixels[top : top + crop, left : left + crop]
    return torch.tensor(pixels.transpose(2, 0, 1) / 255.0, dtype=torch.float32)


# -- the image folder ---------------------------------------------------------------------


def test_classes_labels_and_order_follow_torchvision(folder):
    data = ImageFolder(folder)
    assert data.classes == ["n01", "n02", "n03"]
    assert data.class_to_idx == {"n01": 0, "n02": 1, "n03": 2}
    names = [Path(path).relative_to(folder).as_posix() for path, _ in data.samples]
    assert names == [
        "n01/a.JPEG",
        "n01/b.png",
        "n01/sub/c.jpg",
        "n02/A.PNG",
        "n02/b.bmp",
        "n03/x.jpeg",
        "n03/y.webp",
        "n03/z.png",
    ]
    assert data.targets == [0, 0, 0, 1, 1, 2, 2, 2] == [label for _, label in data.samples]
    assert len(data) == 8


def test_images_match_the_torchvision_transform(folder):
    data = ImageFolder(folder)
    for index, (path, label) in enumerate(data.samples):
        image, target = data[index]
        assert target == label
        assert image.shape == (3, 224, 224) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        torch.testing.assert_close(image, reference(path), rtol=0, atol=1e-7)
    gray = data[1][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_resize_and_crop_sizes_and_rounding():
    sizes = {
        (300, 260): (295, 256),  # int(256 * 300 / 260) = 295
        (260, 300): (256, 295),
        (224, 224): (256, 256),
        (400, 257): (398, 256),
        (256, 999): (256, 999),  # already 256: unchanged
    }
    for size, expected in sizes.items():
        assert resize_shorter_side(Image.new("RGB", size), 256).size == expected
    # a coordinate-coded image shows where the crop starts: round half to even, as
    # torchvision's int(round((h - 224) / 2.0))
    for (width, height), (top, left) in {
        (295, 256): (16, 36),  # round(35.5) = 36
        (225, 225): (0, 0),  # round(0.5) = 0
        (227, 229): (2, 2),  # round(2.5) = 2, round(1.5) = 2
    }.items():
        rows, cols = np.mgrid[:height, :width]
        coded = Image.fromarray(np.stack([rows, cols, 0 * rows], -1).astype(np.uint8))
        out = np.asarray(center_crop(coded, 224))
        assert out.shape == (224, 224, 3)
        assert (int(out[0, 0, 0]), int(out[0, 0, 1])) == (top, left)
    small = eval_transform(resize=40, crop=32)
    assert small(Image.new("RGB", (80, 50))).shape == (3, 32, 32)


def test_custom_sizes_and_bad_arguments(folder):
    data = ImageFolder(folder, resize=64, crop=56)
    assert data[0][0].shape == (3, 56, 56)
    torch.testing.assert_close(data[3][0], reference(data.samples[3][0], 64, 56), rtol=0, atol=0)
    with pytest.raises(ValueError, match="crop must be at most resize"):
        ImageFolder(folder, resize=200, crop=224)
    with pytest.raises(ValueError, match="resize must be a positive integer"):
        ImageFolder(folder, resize=0)
    with pytest.raises(ValueError, match="crop must be a positive integer"):
        eval_transform(crop=22.5)
    with pytest.raises(TypeError, match="transform must be callable"):
        ImageFolder(folder, transform="resize")
    with pytest.raises(ValueError, match="cannot crop 224x224"):
        center_crop(Image.new("RGB", (300, 200)), 224)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "absent")
    (tmp_path / "flat.jpg").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        ImageFolder(tmp_path)
    _write(tmp_path / "cat" / "1.png", (8, 8), "RGB", 0)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(
        FileNotFoundError, match=r"no image files in the class folder\(s\) \['dog'\]"
    ):
        ImageFolder(tmp_path)
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    data = ImageFolder(tmp_path, resize=8, crop=8)
    assert data[0][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"cannot decode the image .*broken\.jpg"):
        data[1]


def test_a_truncated_jpeg_names_the_file(tmp_path):
    _write(tmp_path / "c" / "whole.jpg", (64, 64), "RGB", 1)
    data = (tmp_path / "c" / "whole.jpg").read_bytes()
    (tmp_path / "c" / "whole.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"whole\.jpg"):
        ImageFolder(tmp_path, resize=32, crop=32)[0]


def test_worker_processes_give_the_same_batches(folder):
    serial = list(imagefolder_loader(folder, batch_size=3, num_workers=0))
    parallel = list(imagefolder_loader(folder, batch_size=3, num_workers=2))
    assert [len(labels) for _, labels in serial] == [3, 3, 2]
    for (a, la), (b, lb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.cat([labels for _, labels in serial]).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    spread = imagefolder_loader(ImageFolder(folder), batch_size=8, num_workers=0, n_samples=3)
    assert next(iter(spread))[1].tolist() == [0, 1, 2]  # indices 1, 4, 6: every class
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        imagefolder_loader(folder, num_workers=-1)
    with pytest.raises(TypeError, match="only apply when data is a path"):
        imagefolder_loader(ImageFolder(folder), resize=128)


# -- the imagenet dataset name ------------------------------------------------------------


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """An ImageNet-shaped root: val/ with 1000 class folders of one small image each."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for index in range(1000):
        pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        folder = root / "val" / f"n{index:08d}"
        folder.mkdir(parents=True)
        Image.fromarray(pixels).save(folder / f"ILSVRC2012_val_{index:08d}.JPEG", quality=95)
    return root


def test_imagenet_is_a_dataset_with_its_statistics(imagenet, tmp_path):
    assert "imagenet" in DATASETS and num_classes("imagenet") == 1000
    assert DATASET_NORMALIZATION["imagenet"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalized(torch.nn.Identity(), "imagenet").mean.flatten().tolist() == pytest.approx(
        [0.485, 0.456, 0.406]
    )
    data = load_dataset("imagenet", imagenet, "test")
    assert isinstance(data, ImageFolder) and len(data) == 1000 and len(data.classes) == 1000
    image, label = data[999]
    assert image.shape == (3, 224, 224) and label == 999
    with pytest.raises(FileNotFoundError, match=r"imagenet: expected the folder .*train"):
        load_dataset("imagenet", imagenet, "train")
    _write(tmp_path / "val" / "n1" / "a.png", (8, 8), "RGB", 0)
    with pytest.raises(ValueError, match="holds 1 class folders"):
        load_dataset("imagenet", tmp_path, "test")
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("imagenet")


# -- ResNet-50 ----------------------------------------------------------------------------


def torchvision_keys() -> list[str]:
    """torchvision's resnet50().state_dict() keys, in order, from its definition."""

    def bn(prefix):
        return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")] + [
            f"{prefix}.num_batches_tracked"
        ]

    keys = ["conv1.weight", *bn("bn1")]
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        for block in range(blocks):
            p = f"layer{stage}.{block}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if block == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return [*keys, "fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    model = with_batchnorm_statistics(ResNet50().eval())
    return model


def test_resnet50_has_torchvisions_names_shapes_and_size(resnet50):
    state = resnet50.state_dict()
    assert list(state) == torchvision_keys() and len(state) == 320
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032
    shapes = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv2.weight": (64, 64, 3, 3),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.2.bn3.weight": (256,),
        "layer2.0.conv1.weight": (128, 256, 1, 1),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "layer2.3.conv3.weight": (512, 128, 1, 1),
        "layer3.0.downsample.1.running_var": (1024,),
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.0.conv1.weight": (512, 1024, 1, 1),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
        "layer4.2.bn3.num_batches_tracked": (),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # v1.5: the stride is on the 3x3 conv, and on the shortcut's 1x1 conv
    assert resnet50.layer2[0].conv2.stride == (2, 2) and resnet50.layer2[0].conv1.stride == (1, 1)
    assert resnet50.layer3[0].downsample[0].stride == (2, 2)
    assert ARCHITECTURES["resnet50"] is ResNet50
    assert ResNet50(num_classes=10).fc.weight.shape == (10, 2048)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ResNet50(num_classes=0)


def test_resnet50_forward(resnet50):
    with torch.no_grad():
        out = resnet50(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 1000) and bool(torch.isfinite(out).all())


def test_torchvision_robustness_and_dataparallel_files_load(resnet50, tmp_path):
    state = resnet50.state_dict()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = resnet50(x)
    torch.save(state, tmp_path / "torchvision.pth")  # torchvision's format: a bare state dict
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "dp.pth")
    # MadryLab robustness: {'model': AttackerModel under DataParallel, 'optimizer': ..., ...}
    madry = {f"module.model.{k}": v for k, v in state.items()}
    madry |= {f"module.attacker.model.{k}": v for k, v in state.items()}
    for owner in ("module.normalizer", "module.attacker.normalize"):
        madry[f"{owner}.new_mean"] = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        madry[f"{owner}.new_std"] = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.save({"model": madry, "epoch": 90, "optimizer": {"state": {}}}, tmp_path / "madry.pt")
    args = argparse.Namespace(model="resnet50", dataset="imagenet", seed=1)
    network = common.build_network(args, tmp_path / "torchvision.pth")  # what the CLI does
    with torch.no_grad():
        assert torch.equal(network(x), expected)
    for name in ("dp.pth", "madry.pt"):  # the same tensors under the model's own names
        loaded = check_state_dict(network, load_state_dict_file(tmp_path / name), name)
        assert list(loaded) == list(state), name
        assert all(torch.equal(loaded[k], v) for k, v in state.items()), name
    network = load_checkpoint(network, tmp_path / "madry.pt")
    assert torch.equal(network.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    wrong = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with pytest.raises(ValueError, match=r"2 missing \(e\.g\. \['fc\.bias', 'fc\.weight'\]\)"):
        check_state_dict(ResNet50(), wrong, "file")


def test_a_model_dict_that_is_not_robustness_format_is_used_as_it_is(tmp_path):
    plain = {"conv.weight": torch.zeros(2, 1, 3, 3), "model.bias": torch.ones(2)}
    torch.save({"model": plain}, tmp_path / "plain.pth")
    assert list(load_state_dict_file(tmp_path / "plain.pth")) == ["conv.weight", "model.bias"]


def test_the_cli_pairs_resnet50_with_imagenet():
    assert common.input_shape("imagenet", "resnet50") == (3, 224, 224)
    assert common.input_shape("cifar10", "resnet18") == (3, 32, 32)
    with pytest.raises(common.UsageError, match="resnet50 takes the 224x224 ImageNet images"):
        common.input_shape("cifar10", "resnet50")
    with pytest.raises(common.UsageError, match="does not fit --dataset imagenet"):
        common.input_shape("imagenet", "preactresnet18")


def test_gdws_eval_on_an_imagenet_folder(imagenet, resnet50, tmp_path, capsys):
    torch.save(resnet50.state_dict(), tmp_path / "resnet50.pth")
    out = tmp_path / "eval.json"
    code = main(
        [
            *("eval", "--model", "resnet50", "--dataset", "imagenet"),
            *("--data-dir", str(imagenet), "--checkpoint", str(tmp_path / "resnet50.pth")),
            *("--attack", "none", "--n-samples", "4", "--batch-size", "4"),
            *("--device", "cpu", "--no-progress", "--json", str(out)),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n_samples"] == 4 and result["dataset"] == "imagenet"
    assert result["parameters"] == 25_557_032
    assert result["conv_macs"] > 4e9  # ResNet-50 at 224x224: about 4.1 GMACs
    assert "resnet50" in capsys.readouterr().out
    assert main(["eval", "--model", "resnet50", "--dataset", "cifar10", "--checkpoint", "x"]) == 2
