"""The evaluation's plots for object detection, written as PNG files (matplotlib, Agg backend).

- a precision-recall curve from an evaluation's confidence entries at one IoU threshold: what
  the user trades by choosing a score threshold;
- a grid of images with their true boxes (dashed) and predicted boxes (solid, label and score).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from evaluation.detection import METRICS_KEY  # noqa: E402

MAX_CURVES = 10  # beyond this many labels, only the overall curve stays readable
TRUE_COLOUR, PREDICTED_COLOUR = "#2ca02c", "#d62728"


def detection_precision_recall_png(
    evaluations: Sequence[Mapping[str, Any]], path: Path, iou_threshold: float = 0.5
) -> Path:
    """Curves of the overall evaluation (the first) and, with few labels, of each label."""
    figure, axes = plt.subplots(figsize=(6, 5), layout="constrained")
    for index, evaluation in enumerate(evaluations):
        if index > MAX_CURVES:
            break
        recall, precision = _curve(evaluation, iou_threshold)
        name = evaluation.get("displayName") or "all labels"
        axes.plot(recall, precision, marker=".", label=name, linewidth=2.5 if index == 0 else 1)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02))
    axes.set_title(f"Precision-recall of boxes at IoU {iou_threshold:g}, by score threshold")
    axes.legend(loc="lower left", fontsize="small")
    return _save(figure, path)


def _curve(evaluation: Mapping[str, Any], iou_threshold: float) -> tuple[list, list]:
    entries = evaluation[METRICS_KEY]["boundingBoxMetricsEntries"]
    entry = min(entries, key=lambda e: abs(e["iouThreshold"] - iou_threshold))
    points = entry["confidenceMetricsEntries"]
    return [p["recall"] for p in points], [p["precision"] for p in points]


def detection_grid_png(
    images: Sequence[np.ndarray],
    truths: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
    path: Path,
    score_threshold: float = 0.5,
    columns: int = 4,
) -> Path:
    """Images (height, width, 3 uint8) with boxes in [0, 1] coordinates, labels 0-based."""
    count = max(len(images), 1)
    columns = min(columns, count)
    rows = -(-count // columns)
    # Constrained layout keeps each title clear of the image above and of the figure's title.
    figure, grid = plt.subplots(
        rows, columns, figsize=(3 * columns, 3.2 * rows + 0.4), squeeze=False, layout="constrained"
    )
    for axes in grid.ravel():
        axes.axis("off")
    for axes, image, truth, prediction in zip(
        grid.ravel(), images, truths, predictions, strict=False
    ):
        height, width = image.shape[:2]
        axes.imshow(image)
        scale = np.array([width, height, width, height], dtype=np.float64)
        for box in _boxes(truth) * scale:
            _draw(axes, box, TRUE_COLOUR, "--", None)
        shown = 0
        for box, label, score in zip(
            _boxes(prediction) * scale,
            np.asarray(prediction["labels"]),
            np.asarray(prediction["scores"], dtype=np.float64),
            strict=True,
        ):
            if score >= score_threshold:
                _draw(axes, box, PREDICTED_COLOUR, "-", f"{labels[int(label)]} {score:.2f}")
                shown += 1
        axes.set_title(f"{len(truth['labels'])} true, {shown} predicted", fontsize=8)
    if not images:
        grid[0, 0].text(0.5, 0.5, "no examples", ha="center", va="center")
    figure.suptitle(f"true boxes dashed, predictions solid (score >= {score_threshold:g})")
    return _save(figure, path)


def _boxes(image: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(image["boxes"], dtype=np.float64).reshape(-1, 4)


def _draw(axes, box: np.ndarray, colour: str, style: str, text: str | None) -> None:
    x_min, y_min, x_max, y_max = box
    axes.add_patch(
        Rectangle(
            (x_min, y_min),
            x_max - x_min,
            y_max - y_min,
            fill=False,
            edgecolor=colour,
            linestyle=style,
            linewidth=1.5,
        )  # fmt: skip
    )
    if text:
        axes.text(x_min, y_min, text, color="white", fontsize=6, va="bottom",
                  bbox={"facecolor": colour, "alpha": 0.7, "pad": 1, "linewidth": 0})  # fmt: skip


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
