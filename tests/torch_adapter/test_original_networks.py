"""The original work's other networks: exact parameter names and shapes, and structure.

``data/original_state_shapes.json`` records, for each ``--model`` name of the original
release, its state dict's entries (name and shape, in order) as the original definitions
build them for CIFAR-10; ``data/robnet_free_code.json`` RobNet-free's published cell codes
(which the shapes cannot tell apart: a zero edge and an identity edge have no parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gdws_torch import convert, count_macs
from gdws_torch.models import (
    ARCHITECTURES,
    ROBNET_FREE_CODE,
    VGG16,
    WRN28_4,
    PreActResNet18,
    PreActResNet18_ADMM,
    PreActResNet50,
    RobNetFree,
    WRN28_4_WithoutSubBlock,
)
from gdws_torch.models.robnet import FactorizedReduce, ResSepConv, SepConv, Zero

RECORDED = json.loads((Path(__file__).parent / "data" / "original_state_shapes.json").read_text())
RECORDED.pop("_about")
# The original's --model name -> ours, where they differ.
OURS = {"vgg16_hydra": "vgg16_bn"}


def test_the_record_holds_every_original_network():
    assert sorted(RECORDED) == [
        "preactresnet18",
        "preactresnet18_admm",
        "preactresnet50",
        "robnetfree",
        "vgg11",
        "vgg13",
        "vgg16",
        "vgg16_hydra",
        "vgg19",
        "wideresnet_28_4",
    ]


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_names_and_shapes_are_the_original_checkpoints(name):
    model = ARCHITECTURES[OURS.get(name, name)]()
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == list(RECORDED[name].items())  # the same entries, in the same order


@pytest.mark.parametrize(
    ("name", "classes"),
    [("preactresnet50", 10), ("preactresnet18_admm", 100), ("vgg11", 100), ("vgg19", 10)],
)
def test_the_networks_classify_32x32_images(name, classes):
    model = ARCHITECTURES[name](num_classes=classes).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, classes)


def test_the_cifar_vgg_family_differs_from_hydras_vgg16():
    convs = {
        name: [m for m in ARCHITECTURES[name]().modules() if isinstance(m, nn.Conv2d)]
        for name in ("vgg11", "vgg13", "vgg16", "vgg19", "vgg16_bn")
    }
    assert {name: len(c) for name, c in convs.items()} == {
        "vgg11": 8,
        "vgg13": 10,
        "vgg16": 13,
        "vgg19": 16,
        "vgg16_bn": 13,
    }
    assert all(conv.bias is not None for conv in convs["vgg16"])  # HYDRA's have none
    assert all(conv.bias is None for conv in convs["vgg16_bn"])
    ours, hydra = VGG16().eval(), ARCHITECTURES["vgg16_bn"]().eval()
    assert isinstance(ours.classifier, nn.Linear) and ours.classifier.in_features == 512
    assert len(hydra.classifier) == 5
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        features = ours.features(x)
        assert features.shape == (1, 512, 1, 1)
        torch.testing.assert_close(ours(x), ours.classifier(features.flatten(1)))


def test_the_admm_network_has_no_final_batchnorm():
    torch.manual_seed(0)
    admm = PreActResNet18_ADMM().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = admm.conv1(x)
        for stage in (admm.layer1, admm.layer2, admm.layer3, admm.layer4):
            out = stage(out)
        expected = admm.linear(F.avg_pool2d(out, 4).flatten(1))  # the original's forward
        torch.testing.assert_close(admm(x), expected)
        # The usual PreActResNet-18 with the same weights differs: its final BN-ReLU.
        usual = PreActResNet18().eval()
        usual.load_state_dict(admm.state_dict(), strict=False)
        assert not torch.allclose(usual(x), admm(x))
    assert admm.layer2[0].shortcut[0].kernel_size == (1, 1)
    assert not hasattr(admm.layer1[0], "shortcut")


def test_preactresnet50_bottlenecks():
    model = PreActResNet50().eval()
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        3,
        4,
        6,
        3,
    ]
    block = model.layer2[0]
    assert block.conv2.stride == (2, 2) and block.conv1.stride == (1, 1)
    assert block.shortcut[0].stride == (2, 2)
    assert model.linear.in_features == 2048
    assert count_macs(model, (3, 32, 32)).conv_macs > 1e9


def test_wideresnet_28_4_is_wrn_28_4_without_the_unused_block():
    torch.manual_seed(0)
    full = WRN28_4().eval()
    without = WRN28_4_WithoutSubBlock().eval()
    assert without.sub_block1 is None
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("sub_block1.")}
    assert len(kept) < len(full.state_dict())
    assert list(without.state_dict()) == list(kept)
    without.load_state_dict(kept)  # strict: exactly those entries
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(without(x), full(x))
    assert ARCHITECTURES["wideresnet_28_4"] is WRN28_4_WithoutSubBlock
    assert ARCHITECTURES["wrn_28_4"] is WRN28_4


def test_robnet_free_has_the_published_architecture_code():
    path = Path(__file__).parent / "data" / "robnet_free_code.json"
    published = json.loads(path.read_text())["robnet_free"]
    assert [" ".join(cell) for cell in ROBNET_FREE_CODE] == published


def test_robnet_free_follows_its_architecture_code():
    model = RobNetFree().eval()
    assert len(model.cells) == 20 and len(ROBNET_FREE_CODE) == 20
    assert [i for i, cell in enumerate(model.cells) if cell.reduction] == [6, 13]
    assert [cell.preprocess1.op[1].out_channels for cell in model.cells[5:8]] == [36, 72, 72]
    assert model.classifier.in_features == 4 * 144
    for cell, code in zip(model.cells, ROBNET_FREE_CODE, strict=True):
        edge = 0
        for node in range(4):
            for state in range(2 + node):
                stride = 2 if cell.reduction and state < 2 else 1
                op = cell._ops[edge].op
                expected = {
                    "00": Zero,
                    "01": SepConv,
                    "10": nn.Identity if stride == 1 else FactorizedReduce,
                    "11": ResSepConv,
                }[code[edge]]
                assert type(op) is expected
                if code[edge] == "11":
                    assert type(op.res) is (nn.Identity if stride == 1 else FactorizedReduce)
                edge += 1
    # Every cell BatchNorm is without affine parameters; the stem's has them.
    norms = [m for m in model.cells.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.affine for m in norms)
    assert model.stem[1].affine
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        # A "00" edge contributes zeros (subsampled where the edge has stride 2).
        assert torch.equal(Zero(2)(x), torch.zeros(2, 3, 16, 16))


def test_robnet_cells_sum_their_edges():
    """Node i of a cell is the sum of its edges' operations on all earlier states."""
    torch.manual_seed(0)
    cell = RobNetFree().cells[0].eval()
    s0, s1 = torch.rand(1, 108, 8, 8), torch.rand(1, 108, 8, 8)
    with torch.no_grad():
        states = [cell.preprocess0(s0), cell.preprocess1(s1)]
        edge = 0
        for _ in range(4):
            node = torch.zeros_like(states[0])
            for state in states:
                node = node + cell._ops[edge](state)
                edge += 1
            states.append(node)
        torch.testing.assert_close(cell(s0, s1), torch.cat(states[2:], dim=1))


def test_the_new_networks_convert():
    torch.manual_seed(0)
    for name in ("vgg11", "preactresnet18_admm"):
        model = ARCHITECTURES[name]().eval()
        converted, report = convert(model, target_mac_reduction=1.3, progress=False)
        assert report.mac_reduction >= 1.3
        assert count_macs(converted, (3, 32, 32)).conv_macs == report.macs
    # RobNet-free's convs are depthwise or 1x1 already: only its stem is a dense 3x3 one.
    with pytest.raises(ValueError, match="no eligible convolution"):
        convert(RobNetFree().eval(), beta=0.0, progress=False)
    _, report = convert(RobNetFree().eval(), beta=0.0, skip_first=False, progress=False)
    assert [layer.name for layer in report.layers] == ["stem.0"]
