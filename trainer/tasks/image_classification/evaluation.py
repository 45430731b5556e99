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
    """For image or video classification; ``items`` (images) add the worst-examples grid."""
    from evaluation.classification import accuracy, classification_evaluations

    resources = named(model_name, classification_evaluations(scores, targets, labels))
    figures = resources[0]["classificationEvaluationMetrics"]

    def plots(folder: Path) -> list[Path]:
        from evaluation.plots import confusion_matrix_png, image_grid_png, precision_recall_png

        counts = np.array([row["exampleCount"] for row in figures["confusionMatrix"]["row"]])
        written = [
            precision_recall_png(scores, targets, labels, folder / "precision_recall.png"),
            confusion_matrix_png(counts, labels, folder / "confusion_matrix.png"),
        ]
        if items is not None:
            images, titles = worst_examples(scores, targets, items, labels)
            written.append(image_grid_png(images, titles, folder / "worst_examples.png"))
        return written

    headline = {
        "accuracy": accuracy(resources[0]),
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
    """The examples with the lowest score for their true label, with what the model said."""
    from PIL import Image

    true_scores = scores[np.arange(len(targets)), targets]
    images, titles = [], []
    for index in np.argsort(true_scores)[:count]:
        predicted = int(scores[index].argmax())
        with Image.open(items[index].path) as image:
            images.append(np.asarray(image.convert("RGB")))
        titles.append(
            f"{Path(items[index].key).name}\ntrue {labels[targets[index]]} "
            f"({true_scores[index]:.2f}), said {labels[predicted]} ({scores[index, predicted]:.2f})"
        )
    return images, titles


def score_batches(network: Any, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true label indices of every (inputs, targets) batch; a batch
    that failed to load entirely (None, as video loaders give) is left out."""
    import torch

    scores, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            inputs, batch_targets = batch
            scores.append(network(inputs).float().softmax(dim=1))
            targets.append(batch_targets)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()
