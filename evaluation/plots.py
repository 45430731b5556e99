"""The evaluation's plots for classification, written as PNG files.

matplotlib with the Agg backend: no display is needed, and nothing is shown.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_precision_recall_curve  # noqa: E402

from evaluation.classification import truth_of  # noqa: E402

MAX_CURVES = 10  # beyond this many labels, only the pooled curve stays readable


def precision_recall_png(
    scores: np.ndarray, targets: np.ndarray, labels: Sequence[str], path: Path
) -> Path:
    """The pooled (micro-averaged) curve, and one per label when there are few labels;
    ``targets`` are label indices, or a MULTILABEL model's rows of 0 and 1."""
    truth = truth_of(targets, len(labels)).astype(np.int64)
    figure, axes = plt.subplots(figsize=(6, 5))
    _curve(axes, scores.ravel(), truth.ravel(), "all labels", linewidth=2.5)
    if len(labels) <= MAX_CURVES:
        for index, label in enumerate(labels):
            _curve(axes, scores[:, index], truth[:, index], label, linewidth=1)
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    axes.set_title("Precision-recall on the evaluated examples")
    axes.legend(loc="lower left", fontsize="small")
    return _save(figure, path)


def _curve(axes, scores: np.ndarray, truth: np.ndarray, name: str, linewidth: float) -> None:
    with warnings.catch_warnings():  # a label absent from the examples: a flat, honest curve
        warnings.filterwarnings("ignore", "No positive samples")
        precision, recall, _ = binary_precision_recall_curve(
            torch.from_numpy(scores), torch.from_numpy(truth)
        )
    axes.plot(recall.numpy(), precision.numpy(), label=name, linewidth=linewidth)


def confusion_matrix_png(matrix: np.ndarray, labels: Sequence[str], path: Path) -> Path:
    """A heat map of example counts, rows normalized so that colours compare across labels."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.5 * len(labels) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(labels))
    axes.set_xticks(ticks, labels, rotation=45, ha="right")
    axes.set_yticks(ticks, labels)
    axes.set(xlabel="predicted label", ylabel="true label", title="Confusion matrix")
    if len(labels) <= 20:  # counts in the cells stay legible up to about this many labels
        for row, col in np.ndindex(matrix.shape):
            colour = "white" if shares[row, col] > 0.5 else "black"
            axes.text(col, row, str(matrix[row, col]), ha="center", va="center", color=colour)
    figure.colorbar(image, ax=axes, label="share of the true label's examples")
    return _save(figure, path)


def image_grid_png(images: Sequence[np.ndarray], titles: Sequence[str], path: Path) -> Path:
    """Images (height, width, 3 uint8) in a grid of up to 4 columns, each with its title."""
    count = max(len(images), 1)
    columns = min(4, count)
    rows = -(-count // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(3 * columns, 3.5 * rows), squeeze=False)
    for axes in grid.ravel():
        axes.axis("off")
    for axes, image, title in zip(grid.ravel(), images, titles, strict=False):
        axes.imshow(image)
        axes.set_title(title, fontsize=8)
    if not images:
        grid[0, 0].text(0.5, 0.5, "no examples", ha="center", va="center")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
