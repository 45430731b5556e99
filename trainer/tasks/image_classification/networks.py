"""Building the torchvision backbone that a model type names, with a head for our labels."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from trainer.errors import UserError


def classifiers() -> list[str]:
    """torchvision's image classifiers: the only builders a config (or a stored one) may name."""
    return models.list_models(module=models)


def build_backbone(constructor: str, num_classes: int, pretrained: bool) -> nn.Module:
    if constructor not in classifiers():
        raise UserError(
            f"model.constructor={str(constructor)[:80]!r} is not a torchvision image "
            "classifier; use one of torchvision.models.list_models(module=torchvision.models)"
        )
    builder = models.get_model_builder(constructor)
    if pretrained:
        model = builder(weights=local_weights(constructor))
        _replace_head(model, num_classes)
    else:
        model = builder(weights=None, num_classes=num_classes)
    _settle_batch_norm(model)
    return model


def local_weights(constructor: str) -> models.WeightsEnum:
    """The default weights, only if already in the local torch hub cache: we never download."""
    weights = models.get_model_weights(constructor).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise UserError(
            f"model.pretrained=true needs {cached}, which is not in the local torch hub cache; "
            "copy the weights file there, or train from scratch with model.pretrained=false"
        )
    return weights


def _replace_head(model: nn.Module, num_classes: int) -> None:
    if isinstance(getattr(model, "fc", None), nn.Linear):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        return
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Sequential) and isinstance(classifier[-1], nn.Linear):
        classifier[-1] = nn.Linear(classifier[-1].in_features, num_classes)
        return
    raise UserError(f"cannot replace the classification head of {type(model).__name__}")


def _settle_batch_norm(model: nn.Module) -> None:
    # torchvision's MobileNetV3 uses BatchNorm momentum 0.01; trained from scratch its running
    # statistics never settle within a short budget and eval accuracy stays at chance
    # (DESIGN.md, measured). 0.1 is PyTorch's default and what EfficientNet and ResNet use.
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1
