"""What image and video classification share for evaluations: scoring batches, AutoML's
classification ModelEvaluation resources with their plots, and the worst-examples grid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.manifest import Item
from trainer.store.evaluations import Evaluation, named

WORST_EXAMPLES = 8


def classification_evaluation(
    model_name: str,
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    items: Sequence[Item] | None = None,
) -> Evaluation:
    """For image or video classification; ``items`` (images) add the worst-examples grid.
    ``targets``: label indices, or a MULTILABEL model's rows of 0 and 1 (no confusion matrix,
    and its accuracy is the share of examples given exactly their labels at 0.5)."""
    from evaluation.classification import accuracy, classification_evaluations, exact_match

    resources = named(model_name, classification_evaluations(scores, targets, labels))
    figures = resources[0]["classificationEvaluationMetrics"]
    multilabel = targets.ndim == 2

    def plots(folder: Path) -> list[Path]:
        from evaluation.plots import confusion_matrix_png, image_grid_png, precision_recall_png

        written = [precision_recall_png(scores, targets, labels, folder / "precision_recall.png")]
        if not multilabel:
            counts = np.array([row["exampleCount"] for row in figures["confusionMatrix"]["row"]])
            written.append(confusion_matrix_png(counts, labels, folder / "confusion_matrix.png"))
        if items is not None:
            images, titles = worst_examples(scores, targets, items, labels)
            written.append(image_grid_png(images, titles, folder / "worst_examples.png"))
        return written

    if multilabel:
        first = {"exactMatch": exact_match(scores, targets)}
    else:
        first = {"accuracy": accuracy(resources[0])}
    headline = {
        **first,
        "auPrc": figures["auPrc"],
        "auRoc": figures["auRoc"],
        "logLoss": figures["logLoss"],
    }
    return Evaluation(resources, headline, plots)


def worst_examples(
    scores: np.ndarray,
    targets: np.ndarray,
    items: Sequence[Item],
    labels: Sequence[str],
    count: int = WORST_EXAMPLES,
) -> tuple[list[np.ndarray], list[str]]:
    """The examples with the lowest score for their true label, with what the model said; a
    MULTILABEL model's, those with the worst single decision (a true label scored lowest, or a
    false one highest)."""
    from PIL import Image

    if targets.ndim == 2:
        badness = np.abs(targets - scores).max(axis=1)
    else:
        badness = 1 - scores[np.arange(len(targets)), targets]
    images, titles = [], []
    for index in np.argsort(-badness, kind="stable")[:count]:
        with Image.open(items[index].path) as image:
            images.append(np.asarray(image.convert("RGB")))
        said = _said(scores[index], targets[index], labels)
        titles.append(f"{Path(items[index].key).name}\n{said}")
    return images, titles


def _said(scores: np.ndarray, target: Any, labels: Sequence[str]) -> str:
    if np.ndim(target) == 1:  # MULTILABEL: every label at or over 0.5
        true = ", ".join(labels[int(i)] for i in np.flatnonzero(target)) or "none"
        chosen = np.flatnonzero(scores >= 0.5)
        said = ", ".join(f"{labels[int(i)]} ({scores[i]:.2f})" for i in chosen)
        return f"true {true}, said {said or 'none'}"
    predicted = int(scores.argmax())
    return (f"true {labels[target]} ({scores[target]:.2f}), said {labels[predicted]} "
            f"({scores[predicted]:.2f})")  # fmt: skip


def score_batches(
    network: Any, loader: Any, multilabel: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (a MULTILABEL model's: each label's sigmoid) and true labels of every
    (inputs, targets) batch; a batch that failed to load entirely (None, as video loaders give)
    is left out."""
    import torch

    from trainer.tasks.image_classification.predict import label_scores

    scores, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            inputs, batch_targets = batch
            scores.append(label_scores(network(inputs), multilabel))
            targets.append(batch_targets)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()
