"""Model definitions with the parameter names of the original checkpoints (32x32 inputs).

``resnet50`` takes 224x224 ImageNet inputs and has torchvision's parameter names.
"""

from gdws_torch.models.digits import DigitsCNN, DigitsCNNWide
from gdws_torch.models.preact_resnet import PreActBlock, PreActResNet, PreActResNet18
from gdws_torch.models.resnet import ResNet, ResNet18
from gdws_torch.models.resnet50 import Bottleneck, ImageNetResNet, ResNet50
from gdws_torch.models.vgg import VGG, VGG16_BN
from gdws_torch.models.wide_resnet import WRN28_4, WideResNet

ARCHITECTURES = {
    "preactresnet18": PreActResNet18,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vgg16_bn": VGG16_BN,
    "wrn_28_4": WRN28_4,
    "digits_cnn": DigitsCNN,
    "digits_cnn_wide": DigitsCNNWide,
}

__all__ = [
    "ARCHITECTURES",
    "VGG",
    "VGG16_BN",
    "WRN28_4",
    "Bottleneck",
    "DigitsCNN",
    "DigitsCNNWide",
    "ImageNetResNet",
    "PreActBlock",
    "PreActResNet",
    "PreActResNet18",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "WideResNet",
]
