"""Model definitions with the parameter names of the original checkpoints."""

from gdws_torch.models.preact_resnet import PreActBlock, PreActResNet, PreActResNet18

__all__ = ["PreActBlock", "PreActResNet", "PreActResNet18"]
