"""Model definitions with the parameter names of the original checkpoints (32x32 inputs).

``ARCHITECTURES`` maps each name to a constructor taking ``num_classes``. The original
work's ``--model`` names are there as they are (``preactresnet18``, ``preactresnet50``,
``preactresnet18_admm``, ``vgg11`` ... ``vgg19``, ``wideresnet_28_4``, ``robnetfree``,
``resnet18``; HYDRA's VGG-16 is ``vgg16_bn``, the CLI's alias ``vgg16_hydra``).
``resnet50`` takes 224x224 ImageNet inputs and has torchvision's parameter names.
"""

from gdws_torch.models.cifar_vgg import VGG11, VGG13, VGG16, VGG19, CifarVGG
from gdws_torch.models.digits import DigitsCNN, DigitsCNNWide
from gdws_torch.models.preact_resnet import PreActBlock, PreActResNet, PreActResNet18
from gdws_torch.models.preact_resnet50 import PreActBottleneck, PreActResNet50
from gdws_torch.models.preact_resnet_admm import PreActResNet18_ADMM, PreActResNetADMM
from gdws_torch.models.resnet import ResNet, ResNet18
from gdws_torch.models.resnet50 import Bottleneck, ImageNetResNet, ResNet50
from gdws_torch.models.robnet import ROBNET_FREE_CODE, RobNet, RobNetFree
from gdws_torch.models.vgg import VGG, VGG16_BN
from gdws_torch.models.wide_resnet import WRN28_4, WideResNet, WRN28_4_WithoutSubBlock

ARCHITECTURES = {
    "preactresnet18": PreActResNet18,
    "preactresnet18_admm": PreActResNet18_ADMM,
    "preactresnet50": PreActResNet50,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "robnetfree": RobNetFree,
    "vgg11": VGG11,
    "vgg13": VGG13,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "vgg16_bn": VGG16_BN,
    "wideresnet_28_4": WRN28_4_WithoutSubBlock,
    "wrn_28_4": WRN28_4,
    "digits_cnn": DigitsCNN,
    "digits_cnn_wide": DigitsCNNWide,
}

__all__ = [
    "ARCHITECTURES",
    "ROBNET_FREE_CODE",
    "VGG",
    "VGG11",
    "VGG13",
    "VGG16",
    "VGG16_BN",
    "VGG19",
    "WRN28_4",
    "Bottleneck",
    "CifarVGG",
    "DigitsCNN",
    "DigitsCNNWide",
    "ImageNetResNet",
    "PreActBlock",
    "PreActBottleneck",
    "PreActResNet",
    "PreActResNet18",
    "PreActResNet18_ADMM",
    "PreActResNet50",
    "PreActResNetADMM",
    "ResNet",
    "ResNet18",
    "ResNet50",
    "RobNet",
    "RobNetFree",
    "WRN28_4_WithoutSubBlock",
    "WideResNet",
]
