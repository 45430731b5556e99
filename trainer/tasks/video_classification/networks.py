"""Building the video network a model type names, with a head for our labels.

``model.constructor`` is a torchvision video builder (``r2plus1d_18``, ``r3d_18``, ``mc3_18``,
``s3d``, ``mvit_v2_s``, ...) or ``r2plus1d_small``, this project's narrow R(2+1)D for the
``mobile-versatile-1`` type: R(2+1)D-18's blocks at an eighth of its width and one block a stage
(about 0.3 M parameters instead of 31 M), which trains in seconds on small clips on a CPU.

Inputs are (N, C, T, H, W). The ResNet-style networks and S3D take any clip length and frame size
the strides allow (T >= 1, H and W >= 32 or so); MViT-V2 and Swin3D need their own input size
(16 frames of 224 x 224 for ``mvit_v2_s``), so their model type must say so.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision import models
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D

from trainer.errors import UserError
from trainer.tasks.pretrained import LocalWeights, load_matching, torchvision_weights

SMALL = "r2plus1d_small"


def video_constructors() -> list[str]:
    return sorted([*models.list_models(module=models.video), SMALL])


def build_video_backbone(
    constructor: str, num_classes: int, pretrained: LocalWeights | None = None
) -> nn.Module:
    """A video classifier returning (N, num_classes) logits, starting from ``pretrained``
    (checked Kinetics weights from the local cache) where given; never downloads."""
    if constructor == SMALL:
        if pretrained is not None:
            raise UserError(
                f"model.constructor={SMALL} has no pretrained weights; "
                "train it from scratch with model.pretrained=false"
            )
        return SmallR2Plus1D(num_classes)
    if constructor not in models.list_models(module=models.video):
        raise UserError(
            f"model.constructor={constructor!r} is not a video network; "
            f"use one of {', '.join(video_constructors())}"
        )
    model = models.get_model_builder(constructor)(weights=None, num_classes=num_classes)
    return model if pretrained is None else load_matching(model, pretrained)


def pretrained_weights(constructor: str) -> models.WeightsEnum | None:
    return None if constructor == SMALL else torchvision_weights(constructor)


class SmallR2Plus1D(nn.Module):
    """R(2+1)D (Tran et al., 2018) narrowed: torchvision's blocks, ``widths`` channels a stage."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (8, 16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1, 1),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.stem = _stem(widths[0])
        stages, channels = [], widths[0]
        for index, (width, depth) in enumerate(zip(widths, blocks, strict=True)):
            stages.append(_stage(channels, width, depth, stride=1 if index == 0 else 2))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, clips):
        return self.head(self.pool(self.stages(self.stem(clips))))


def _stem(width: int) -> nn.Sequential:
    # R(2+1)D's stem, narrowed: a spatial 7x7 (stride 2) then a temporal 3, as in torchvision.
    middle = max(8, width * 45 // 64)
    return nn.Sequential(
        nn.Conv3d(3, middle, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(middle),
        nn.ReLU(inplace=True),
        nn.Conv3d(middle, width, (3, 1, 1), padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(width),
        nn.ReLU(inplace=True),
    )


def _stage(channels: int, width: int, depth: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or channels != width:
        downsample = nn.Sequential(
            nn.Conv3d(channels, width, 1, stride=Conv2Plus1D.get_downsample_stride(stride)),
            nn.BatchNorm3d(width),
        )
    blocks = [BasicBlock(channels, width, Conv2Plus1D, stride, downsample)]
    blocks += [BasicBlock(width, width, Conv2Plus1D) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)
