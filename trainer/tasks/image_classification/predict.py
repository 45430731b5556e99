"""Image classification's batch-prediction records: AutoML's JSONL line per image,
``image_classification_N.jsonl``, the labels scoring at least the threshold, best first. A
MULTICLASS model's scores are a softmax over its labels; a MULTILABEL model scores each label
on its own (a sigmoid each), so that any number of them may reach the threshold."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.data.prediction import Records
from trainer.settings import MULTILABEL, Settings
from trainer.tasks import OnlineModel

RESULTS_PREFIX = "image_classification"


def classification_record(
    image_id: str, scores: np.ndarray, labels: Sequence[str], threshold: float
) -> dict[str, Any]:
    """AutoML's JSONL line: the labels scoring at least ``threshold``, best first."""
    order = np.argsort(-scores, kind="stable")
    return {
        "ID": image_id,
        "annotations": [
            {
                "annotationSpecId": str(index),
                "displayName": labels[index],
                "classification": {"score": float(scores[index])},
            }
            for index in order
            if scores[index] >= threshold
        ],
    }


def multilabel(settings: Settings) -> bool:
    """Whether the model scores each label on its own (a MULTILABEL dataset's, as its training
    settled dataset.classification_type)."""
    return settings.dataset.classification_type == MULTILABEL


def label_scores(logits: Any, multilabel: bool) -> Any:
    """Each label's score from the network's logits (a torch tensor, examples by labels)."""
    logits = logits.float()
    return logits.sigmoid() if multilabel else logits.softmax(dim=1)


def classification_records(
    network: Any, labels: Sequence[str], threshold: float, multilabel: bool = False
) -> Records:
    def records(pixels: Any, ids: list[str]) -> list[dict[str, Any]]:
        scores = label_scores(network(pixels), multilabel).numpy()
        pairs = zip(ids, scores, strict=True)
        return [classification_record(i, row, labels, threshold) for i, row in pairs]

    return records


# AutoML's default score_threshold for online prediction.
ONLINE_PARAMS = {"score_threshold": 0.5}


def classification_online(
    network: Any, labels: Sequence[str], transform: Any, multilabel: bool = False
) -> OnlineModel:
    """A deployed classifier: the scores of batch prediction, AutoML's payload of the labels at
    or over the threshold, and AutoML Edge's every label with its score, best first."""

    def outputs(pixels: Any) -> list[np.ndarray]:
        return list(label_scores(network(pixels), multilabel).cpu().numpy())

    def annotations(scores: np.ndarray, params: dict[str, float]) -> list[dict[str, Any]]:
        return classification_record("", scores, labels, params["score_threshold"])["annotations"]

    def tf_serving(scores: np.ndarray) -> dict[str, Any]:
        order = np.argsort(-scores, kind="stable")
        return {"labels": [labels[i] for i in order], "scores": [float(scores[i]) for i in order]}

    return OnlineModel(transform, outputs, annotations, tf_serving, dict(ONLINE_PARAMS))
