"""How an image classifier is exported: NCHW float images in, logits out, any batch size; the
export must give the trained network's logits on real TEST images to within 1e-4 of their
scale (the largest logit's size, at least 1)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from trainer.data.images import eval_transform, uint8_pixels
from trainer.data.manifest import Item
from trainer.settings import Settings
from trainer.tasks import TOP_LABEL, Decision, ExportPlan, TfLitePlan, Verification
from trainer.tasks.image_classification.predict import multilabel

# Of the logits' scale: float32 rounding grows with a network's depth and its logits' size
# (EfficientNet-B0's ONNX logits differed by 1.2e-4 at a scale above 1, a correct export).
TOLERANCE = 1e-4
RESIZE_RULE = (
    "resize the whole image to input_size (bilinear, antialiased; no crop), scale to [0, 1], "
    "then normalize each channel: (x - mean) / std"
)


# A MULTILABEL model's decision: every label whose sigmoid is at least 0.5 (a logit of 0 or
# more), as its prediction's default score_threshold and test_exact_match have it.
LABEL_SET = Decision(
    lambda logits: frozenset(np.flatnonzero(logits >= 0).tolist()),
    "label set (the labels scored 0.5 and over)", "exact label-set match",
    "labelSetAgreementWithFloat", "TestExactMatch",
)  # fmt: skip


def logit_comparison(
    tolerance: float | None,
) -> Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], Verification]:
    """Judge exported logits: the same top-1 for every input, and (with a tolerance) every
    logit within ``tolerance`` times the logits' scale (the largest size of one, at least 1)."""

    def compare(expected: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> Verification:
        difference, disagreements, scale = 0.0, 0, 1.0
        for (want,), (have,) in zip(expected, got, strict=True):
            if have.shape != want.shape:
                return Verification({}, f"exported outputs have shape {have.shape}, "
                                        f"expected {want.shape}")  # fmt: skip
            difference = max(difference, float(np.abs(have - want).max()))
            scale = max(scale, float(np.abs(want).max()))
            disagreements += int((have.argmax(axis=1) != want.argmax(axis=1)).sum())
        figures: dict[str, Any] = {"maxAbsDifference": difference, "top1Disagreements":
                                   disagreements}  # fmt: skip
        if tolerance is not None:
            figures["tolerance"] = tolerance * scale
            if not difference < tolerance * scale:
                return Verification(figures, f"exported outputs differ from the trained "
                                    f"model's by up to {difference:.2e} (tolerance "
                                    f"{tolerance:.0e} of the logits' scale, "
                                    f"{tolerance * scale:.2e})")  # fmt: skip
        if disagreements:
            return Verification(figures, f"the exported model's top label differs from the "
                                f"trained model's on {disagreements} TEST inputs")  # fmt: skip
        return Verification(figures)

    return compare


def read_rgb(path: Any) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def export_plan(
    network: nn.Module, settings: Settings, labels: Sequence[str], items: Sequence[Item]
) -> ExportPlan:
    size, mean, std = settings.model.size, settings.data.mean, settings.data.std
    transform = eval_transform(size, mean, std)
    images = [transform(read_rgb(item.path)) for item in items]
    return ExportPlan(
        network=network.eval(),
        example=torch.zeros(2, 3, *size),  # batch 2: a batch of 1 would freeze the size
        input_name="image",
        output_names=["logits"],
        inputs=[torch.stack(images).numpy()] if images else [],
        compare=logit_comparison(TOLERANCE),
        metadata={
            "input_size": list(size),
            "layout": "NCHW, float32, RGB; the batch size is free",
            "mean": list(mean),
            "std": list(std),
            "resize": RESIZE_RULE,
            "output": f"logits, one per line of labels.txt in that order; {scores_rule(settings)}",
        },
    )


def scores_rule(settings: Settings) -> str:
    if multilabel(settings):
        return "each logit's sigmoid is its label's score, independent of the others (MULTILABEL)"
    return "softmax gives scores"


class PixelsIn(nn.Module):
    """The classifier as a TF Lite app feeds it: (1, H, W, 3) uint8 RGB pixels at the input
    size, normalized inside the graph as eval_transform does, logits out."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.network((images - self.mean) / self.std)


def tflite_plan(
    network: nn.Module, settings: Settings, labels: Sequence[str], items: Sequence[Item],
    calibration: Sequence[Item],
) -> TfLitePlan:  # fmt: skip
    size = settings.model.size
    wrapped = PixelsIn(network.eval(), settings.data.mean, settings.data.std).eval()
    index = {label: number for number, label in enumerate(labels)}
    if multilabel(settings):
        decision = LABEL_SET
        truth: list[Hashable] = [frozenset(index[label] for label in item.labels) for item in items]
    else:
        decision, truth = TOP_LABEL, [index[item.label] for item in items]

    def reference(batch: np.ndarray) -> list[np.ndarray]:
        return [wrapped(torch.from_numpy(batch)).numpy()]

    return TfLitePlan(
        network=wrapped,
        example=torch.zeros(1, *size, 3, dtype=torch.uint8),
        inputs=[uint8_pixels(item.path, size) for item in items],
        reference=reference,
        compare=logit_comparison(TOLERANCE),
        calibration=[uint8_pixels(item.path, size) for item in calibration],
        truth=truth,
        decision=decision,
        metadata={
            "input_size": list(size),
            "layout": "1xHxWx3, uint8, RGB pixels; the model normalizes (mean, std below)",
            "mean": list(settings.data.mean),
            "std": list(settings.data.std),
            "resize": RESIZE_RULE.split(", scale to")[0] + "; no normalization: the model does",
            "output": f"logits, one per line of dict.txt in that order; {scores_rule(settings)}",
        },
    )
