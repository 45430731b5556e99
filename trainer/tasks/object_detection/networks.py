"""Building the torchvision detector that an object-detection model type names.

Every detector is built with ``weights=None``, from scratch or then loaded with torchvision's COCO
weights for it (checked, from the local torch hub cache: trainer/tasks/pretrained.py) in all but
the layers sized by the number of labels; we never download. Class 0 is the
background for torchvision's detectors, so a dataset with N labels gets ``num_classes=N + 1``.

The dataset already resizes every image to the model's input size (images.py), so each
detector's own transform is set to leave that size alone: its resize is then a no-op and
predicted boxes come back in input-size pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models import detection
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from trainer.errors import UserError
from trainer.tasks.image_classification.networks import _settle_batch_norm
from trainer.tasks.pretrained import LocalWeights, load_matching

# The model types in latency order (fastest first within mobile and within cloud), with the
# constructor each one names and the input size it is meant for ([height, width]); the Hydra
# model-type configs should carry the same values. Measured on the 2-core CPU at batch 1: see
# trainer/README.md.
MODEL_TYPES: dict[str, tuple[str, tuple[int, int]]] = {
    "mobile-low-latency-1": ("ssdlite320_mobilenet_v3_large", (320, 320)),
    "mobile-versatile-1": ("fasterrcnn_mobilenet_v3_large_320_fpn", (320, 320)),
    "mobile-high-accuracy-1": ("fasterrcnn_mobilenet_v3_large_fpn", (512, 512)),
    "cloud-low-latency-1": ("fcos_resnet50_fpn", (512, 512)),
    "cloud-high-accuracy-1": ("fasterrcnn_resnet50_fpn_v2", (640, 640)),
}
CONSTRUCTORS = frozenset(constructor for constructor, _ in MODEL_TYPES.values())
MAX_DETECTIONS = 100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_detector(
    constructor: str,
    num_labels: int,
    input_size: Sequence[int],
    pretrained: LocalWeights | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> nn.Module:
    """A detector for ``num_labels`` labels (plus background) taking images of ``input_size``.

    Images go in as float tensors in [0, 1]; the detector normalizes them with ``mean``/``std``.
    """
    if constructor not in CONSTRUCTORS:
        known = ", ".join(sorted(CONSTRUCTORS))
        raise UserError(f"model.constructor={constructor!r} is not a detector; use one of {known}")
    height, width = (int(v) for v in input_size)
    builder = getattr(detection, constructor)
    model = builder(weights=None, weights_backbone=None, num_classes=num_labels + 1)
    # SSD's builder passes extra keyword arguments on to its backbone, so the transform is
    # replaced after building rather than configured through the builder, for every detector.
    model.transform = GeneralizedRCNNTransform(
        min(height, width),
        max(height, width),
        list(mean),
        list(std),
        size_divisible=getattr(model.transform, "size_divisible", 32),
        fixed_size=(height, width) if model.transform.fixed_size else None,
    )
    # At most 100 boxes an image, like COCO's mAP and AutoML's max_bounding_box_count; SSD
    # would keep 300, and torchmetrics would drop the extra ones with a warning.
    for owner in (model, getattr(model, "roi_heads", None)):
        if hasattr(owner, "detections_per_img"):
            owner.detections_per_img = MAX_DETECTIONS
    _settle_batch_norm(model)
    return model if pretrained is None else load_matching(model, pretrained)
