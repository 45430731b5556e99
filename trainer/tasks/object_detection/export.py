"""How a detector is exported: one image in; boxes, scores and labels out.

torchvision's detectors take a list of images and return a list of dicts, which no device
runtime takes. ``ExportedDetector`` takes one image, (1, 3, H, W) float RGB in [0, 1] at the
model's input size (the detector normalizes it itself), and returns ``boxes`` (K, 4) as fractions
of the image's width and height (x_min, y_min, x_max, y_max), ``scores`` (K,) best first and
``labels`` (K,) as 0-based indices into labels.txt, K <= 100.

The number of boxes that survive non-maximum suppression depends on the image. torch.onnx's
dynamo exporter stops there (a guard on a data-dependent size in torchvision's batched_nms, with
torch 2.14), so ONNX goes through torch.onnx's TorchScript-based exporter, traced on a real TEST
image, and TorchScript through scripting, which keeps the detector's control flow.

An export is verified as the issue asks of it: every confident detection of the trained network
has one in the export with the same label, a score within 1e-3 and every box edge within a
pixel, and the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from trainer.settings import Settings
from trainer.tasks import ExportPlan, Verification
from trainer.tasks.object_detection.data import DetectionItem
from trainer.tasks.object_detection.images import detection_eval_transform
from trainer.tasks.object_detection.networks import MAX_DETECTIONS

PIXEL_TOLERANCE = 1.0
SCORE_TOLERANCE = 1e-3
RESIZE_RULE = (
    "resize the whole image to input_size (bilinear, antialiased; no crop) and scale to [0, 1]; "
    "no normalization: the model normalizes"
)


class ExportedDetector(nn.Module):
    """A torchvision detector with tensors in and out (see the module's docstring)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.jit.is_scripting():
            found = self.detector([image[0]])[1][0]  # scripted: (losses, detections)
        else:
            found = self.detector([image[0]])[0]
        height, width = image.shape[-2], image.shape[-1]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return found["boxes"] / scale, found["scores"], found["labels"] - 1


def box_comparison(height: int, width: int):
    """Judge exported detections against the trained network's, image by image."""
    pixels = np.array([width, height, width, height], dtype=np.float64)

    def compare(expected: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> Verification:
        worst, compared = 0.0, 0
        for index, (want, have) in enumerate(zip(expected, got, strict=True)):
            for first, second, side in ((want, have, "the export"), (have, want, "PyTorch")):
                boxes, scores, labels = second
                for box, score, label in _must_match(*first):
                    distance = _nearest(box, score, label, boxes, scores, labels, pixels)
                    if distance is None or distance > PIXEL_TOLERANCE:
                        where = "none" if distance is None else f"the nearest {distance:.2f} px off"
                        return Verification(
                            {"maxBoxDifferencePixels": worst, "detectionsCompared": compared},
                            f"TEST image {index + 1}: a detection of label {label} (score "
                            f"{score:.3f}) has no match in {side} ({where})",
                        )
                    worst, compared = max(worst, distance), compared + 1
        figures = {"maxBoxDifferencePixels": worst, "detectionsCompared": compared,
                   "pixelTolerance": PIXEL_TOLERANCE,
                   "scoreTolerance": SCORE_TOLERANCE}  # fmt: skip
        if compared == 0:
            return Verification(figures, "the model detects nothing on the TEST images: "
                                "there is nothing to verify an export on")  # fmt: skip
        return Verification(figures)

    return compare


def _must_match(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray):
    """The detections that the other side must have too. When the list is full, a detection
    near the weakest kept score may fall either side of the cut: it is not required."""
    floor = -np.inf
    if len(scores) >= MAX_DETECTIONS:
        floor = float(scores.min()) + SCORE_TOLERANCE
    for box, score, label in zip(boxes, scores, labels, strict=True):
        if score > floor:
            yield box, float(score), int(label)


def _nearest(
    box: np.ndarray, score: float, label: int, boxes: np.ndarray, scores: np.ndarray,
    labels: np.ndarray, pixels: np.ndarray,
) -> float | None:  # fmt: skip
    """Pixels between ``box`` and the closest box with the same label and score, or None."""
    same = (labels == label) & (np.abs(scores - score) <= SCORE_TOLERANCE)
    if not same.any():
        return None
    return float((np.abs(boxes[same] - box) * pixels).max(axis=1).min())


def export_plan(
    network: nn.Module, settings: Settings, labels: Sequence[str], items: Sequence[DetectionItem]
) -> ExportPlan:
    height, width = settings.model.size
    transform = detection_eval_transform((height, width))
    inputs = []
    for item in items:
        with Image.open(item.path) as image:
            inputs.append(transform(image.convert("RGB"))[None].numpy())
    # Traced on a real image: a blank one could take the detector's no-box branch, and the
    # trace would keep it for every image.
    example = torch.from_numpy(inputs[0]) if inputs else torch.rand(1, 3, height, width)
    return ExportPlan(
        network=ExportedDetector(network).eval(),
        example=example,
        input_name="image",
        output_names=["boxes", "scores", "labels"],
        inputs=inputs,
        compare=box_comparison(height, width),
        metadata={
            "input_size": [height, width],
            "layout": "1x3xHxW, float32, RGB in [0, 1]; one image a call",
            "resize": RESIZE_RULE,
            "outputs": {
                "boxes": "K x 4: x_min, y_min, x_max, y_max as fractions of width and height",
                "scores": "K: best first",
                "labels": "K: 0-based index into labels.txt",
            },
            "maxDetections": MAX_DETECTIONS,
        },
        batch_free=False,
        onnx_exporter="torchscript",
        torchscript="script",
    )
