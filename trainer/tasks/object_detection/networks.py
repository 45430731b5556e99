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
from functools import cache

import yaml
from torch import nn
from torchvision.models import detection
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from trainer import CONF_DIR
from trainer.errors import UserError
from trainer.tasks.image_classification.networks import _settle_batch_norm
from trainer.tasks.pretrained import LocalWeights, load_matching


@cache  # the configs do not change while a process runs
def detectors() -> frozenset[str]:
    """The detectors that conf/task_model/object_detection/ names: the only builders a config
    (or a stored one) may name. Each is built and checked by tests/test_detection_model.py."""
    folder = CONF_DIR / "task_model" / "object_detection"
    models = (yaml.safe_load(path.read_text()).get("model", {}) for path in folder.glob("*.yaml"))
    return frozenset(model["constructor"] for model in models if "constructor" in model)


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
    if constructor not in detectors():
        known = ", ".join(sorted(detectors()))
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
        if owner is not None and hasattr(owner, "detections_per_img"):
            owner.detections_per_img = MAX_DETECTIONS
    _settle_batch_norm(model)
    return model if pretrained is None else load_matching(model, pretrained)
