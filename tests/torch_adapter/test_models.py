"""The bundled architectures: original parameter names, shapes, conversion."""

from __future__ import annotations

import pytest
import torch

from gdws_torch import convert, count_macs, eligible_convs, load_checkpoint
from gdws_torch.models import ARCHITECTURES, WRN28_4

# A few parameter names of the original checkpoints, per architecture.
ORIGINAL_NAMES = {
    "preactresnet18": [
        "conv1.weight",
        "layer1.0.bn1.running_var",
        "layer2.0.shortcut.0.weight",
        "bn.weight",
        "linear.bias",
    ],
    "resnet18": [
        "conv1.weight",
        "bn1.bias",
        "layer2.0.shortcut.1.running_mean",
        "layer4.1.conv2.weight",
        "linear.weight",
    ],
    "vgg16_bn": [
        "features.0.weight",
        "features.1.running_mean",
        "features.40.weight",
        "classifier.0.weight",
        "classifier.4.bias",
    ],
    "wrn_28_4": [
        "conv1.weight",
        "block1.layer.0.convShortcut.weight",
        "sub_block1.layer.3.conv2.weight",
        "block3.layer.3.bn2.weight",
        "bn1.running_var",
        "fc.weight",
    ],
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_NAMES))
def test_architectures_have_the_original_parameter_names(name):
    model = ARCHITECTURES[name]()
    keys = model.state_dict().keys()
    assert all(key in keys for key in ORIGINAL_NAMES[name])
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert ARCHITECTURES[name](num_classes=100).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def test_the_digits_network_shape_and_macs():
    model = ARCHITECTURES["digits_cnn"]().eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    layers = [(16, 1, 32), (16, 32, 64), (8, 64, 64), (8, 64, 128), (4, 128, 128)]
    expected = [side * side * c_in * c_out * 9 for side, c_in, c_out in layers]
    macs = count_macs(model, (1, 16, 16))
    assert [la.macs for la in macs.layers if la.kind == "conv"] == expected
    assert macs.conv_macs == 14_229_504


def test_vgg16_has_13_convs_and_wrn_28_4_its_widths():
    vgg = ARCHITECTURES["vgg16_bn"]()
    assert sum(isinstance(m, torch.nn.Conv2d) for m in vgg.modules()) == 13
    wrn = WRN28_4()
    assert wrn.block3.layer[0].conv1.weight.shape == (256, 128, 3, 3)
    assert len(wrn.block1.layer) == 4


def test_wrn_checkpoint_loads_and_the_unused_sub_block_is_not_converted(tmp_path):
    torch.manual_seed(0)
    source = WRN28_4().eval()
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
        tmp_path / "model_best.pth",
    )
    model = load_checkpoint(WRN28_4().eval(), tmp_path / "model_best.pth")
    assert "sub_block1.layer.0.conv1" in dict(eligible_convs(model))
    converted, report = convert(model, target_mac_reduction=1.5)
    assert not any(layer.name.startswith("sub_block1") for layer in report.layers)
    assert report.mac_reduction >= 1.5
    assert count_macs(converted, (3, 32, 32)).conv_macs == report.macs
