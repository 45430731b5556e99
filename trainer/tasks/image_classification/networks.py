"""Building the torchvision backbone that a model type names, with a head for our labels."""

from __future__ import annotations

from torch import nn
from torchvision import models

from trainer.errors import UserError
from trainer.tasks.pretrained import LocalWeights, load_matching


def classifiers() -> list[str]:
    """torchvision's image classifiers: the only builders a config (or a stored one) may name."""
    return models.list_models(module=models)


def build_backbone(
    constructor: str, num_classes: int, pretrained: LocalWeights | None = None
) -> nn.Module:
    """The network with a head for ``num_classes``, starting from ``pretrained`` where given
    (checked weights from the local cache: trainer/tasks/pretrained.py)."""
    if constructor not in classifiers():
        raise UserError(
            f"model.constructor={str(constructor)[:80]!r} is not a torchvision image "
            "classifier; use one of torchvision.models.list_models(module=torchvision.models)"
        )
    model = models.get_model_builder(constructor)(weights=None, num_classes=num_classes)
    if pretrained is not None:
        load_matching(model, pretrained)
    _settle_batch_norm(model)
    return model


def _settle_batch_norm(model: nn.Module) -> None:
    # torchvision's MobileNetV3 uses BatchNorm momentum 0.01; trained from scratch its running
    # statistics never settle within a short budget and eval accuracy stays at chance
    # (DESIGN.md, measured). 0.1 is PyTorch's default and what EfficientNet and ResNet use.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
