"""Object detection's evaluation: AutoML's detection ModelEvaluation resources (from
evaluation/detection.py) with a precision-recall plot and a grid of TEST images with their
predicted and true boxes."""

from __future__ import annotations

from typing import Any

import numpy as np

from trainer.store.evaluations import Evaluation, named
from trainer.tasks.object_detection.data import DetectionItem

GRID_IMAGES = 8


def detection_evaluation(
    model_name: str,
    predictions: list[dict[str, Any]],
    truths: list[dict[str, Any]],
    labels: list[str],
    items: list[DetectionItem],
) -> Evaluation:
    from evaluation.detection import METRICS_KEY, detection_evaluations, mean_average_precision

    resources = named(model_name, detection_evaluations(predictions, truths, labels))

    def plots(folder):
        from PIL import Image

        from evaluation.detection_plots import detection_grid_png, detection_precision_recall_png

        shown = items[:GRID_IMAGES]
        images = []
        for item in shown:
            with Image.open(item.path) as image:
                images.append(np.asarray(image.convert("RGB")))
        count = len(shown)
        return [
            detection_precision_recall_png(resources, folder / "precision_recall.png"),
            detection_grid_png(images, truths[:count], predictions[:count], labels,
                               folder / "test_boxes.png"),
        ]  # fmt: skip

    overall = resources[0]
    figures = {
        "mAP": overall[METRICS_KEY]["boundingBoxMeanAveragePrecision"],
        "mAP@0.5": mean_average_precision(overall, 0.5),
        "boxes": float(overall[METRICS_KEY]["evaluatedBoundingBoxCount"]),
    }
    return Evaluation(resources, figures, plots)
