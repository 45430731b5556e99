"""How a detector is exported to TF Lite: the network without its non-maximum suppression.

NMS keeps a number of boxes that depends on the image, which neither torch.export nor TF Lite's
static graphs follow. So the graph is SSD's backbone and heads with the box decoding after them
(the anchors of the fixed input size are constants in it): one image in, (1, H, W, 3) uint8 RGB
pixels at the input size, normalized in the graph; out ``boxes`` (1, A, 4), every anchor's box
as fractions of the width and height (x_min, y_min, x_max, y_max, clipped to the image), and
``scores`` (1, A, C), each anchor's softmax over background (column 0) and the labels. What
follows, ``ssd_postprocess.py``, is SSD's own: per label, scores above ``scoreThreshold``, the
best ``topkCandidates``, NMS at ``nmsIouThreshold`` per label, then the best
``maxDetections`` (tflite_metadata.json gives the figures). The package is verified as the
ONNX detector's: the same boxes as the trained model, within a pixel.

Only detectors whose heads score every anchor export so: Faster R-CNN chooses its regions with
NMS inside the network (its RPN), and is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from trainer.data.images import uint8_pixels
from trainer.errors import UserError
from trainer.settings import Settings
from trainer.tasks import TfLitePlan
from trainer.tasks.object_detection.data import DetectionItem
from trainer.tasks.object_detection.export import ExportedDetector, box_comparison
from trainer.tasks.object_detection.ssd_postprocess import postprocess


class DecodedAnchors(nn.Module):
    """SSD's backbone, heads and box decoding for one (1, H, W, 3) uint8 image (see above)."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: torch.Tensor
    anchors: torch.Tensor

    def __init__(self, detector: Any, height: int, width: int) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head
        self.box_coder = detector.box_coder  # torchvision's BoxCoder: not a module
        transform = detector.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1))
        self.register_buffer(
            "scale", torch.tensor([width, height, width, height], dtype=torch.float32)
        )
        with torch.no_grad():
            blank = torch.zeros(1, 3, height, width)
            features = list(self.backbone(blank).values())
            anchors = detector.anchor_generator(ImageList(blank, [(height, width)]), features)[0]
        self.register_buffer("anchors", anchors)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        features = list(self.backbone((images - self.mean) / self.std).values())
        head = self.head(features)
        boxes = self.box_coder.decode_single(head["bbox_regression"][0], self.anchors)
        boxes = torch.minimum(boxes.clamp(min=0), self.scale) / self.scale
        return boxes[None], torch.softmax(head["cls_logits"], dim=-1)


def tflite_plan(
    network: Any, settings: Settings, items: Sequence[DetectionItem], quantize: str,
    exports: Sequence[str],
) -> TfLitePlan:  # fmt: skip
    """``exports``: the constructors this converts (conf/export.yaml)."""
    constructor = settings.model.constructor
    if constructor not in exports:
        raise UserError(
            f"TF Lite cannot take model.constructor={constructor}: it chooses its regions with "
            "non-maximum suppression inside the network, which a TF Lite graph cannot hold; "
            f"the detectors that export to TF Lite are {', '.join(exports)}"
        )
    if quantize != "none":
        raise UserError("--quantize int8 is offered for image classification; a detector "
                        "exports to TF Lite in float32")  # fmt: skip
    height, width = settings.model.size
    network = network.eval()
    detector = ExportedDetector(network).eval()
    post = {"scoreThreshold": float(network.score_thresh), "nmsIouThreshold":
            float(network.nms_thresh), "topkCandidates": int(network.topk_candidates),
            "maxDetections": int(network.detections_per_img)}  # fmt: skip

    def reference(batch: np.ndarray) -> list[np.ndarray]:
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return [output.numpy() for output in detector(images)]

    return TfLitePlan(
        network=DecodedAnchors(network, height, width).eval(),
        example=torch.zeros(1, height, width, 3, dtype=torch.uint8),
        inputs=[uint8_pixels(item.path, (height, width)) for item in items],
        reference=reference,
        postprocess=lambda outputs: postprocess(outputs, post),
        compare=box_comparison(height, width),
        metadata={
            "input_size": [height, width],
            "layout": "1xHxWx3, uint8, RGB pixels; the model normalizes",
            "resize": "resize the whole image to input_size (bilinear, antialiased; no crop)",
            "outputs": {
                "boxes": "1 x A x 4: every anchor's box, x_min, y_min, x_max, y_max as fractions "
                "of width and height",
                "scores": "1 x A x C: every anchor's softmax; column 0 is the background, "
                "column i the label on line i of dict.txt",
            },
            "postprocessing": {
                "method": "SSD: per label, scores above scoreThreshold, the best "
                "topkCandidates, NMS at nmsIouThreshold; then the best "
                "maxDetections of all labels",
                **post,
            },  # fmt: skip
        },
    )
