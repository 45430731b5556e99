"""AutoML ModelEvaluation resources for classification, from scores and true labels.

AutoML scores a multi-class model one-vs-rest: every (example, label) pair is a binary decision,
and the overall figures pool all pairs (micro-averaging); a per-label evaluation keeps only that
label's column. The "At1" figures count only each example's best label. A multi-label model
(MULTILABEL: any number of true labels an example, each scored on its own) is scored the same
way, pair by pair, with the log loss of every pair and no confusion matrix, as AutoML did.

The area metrics and the confusion matrix come from torchmetrics. The counts per confidence
threshold are plain NumPy: torchmetrics' stat scores read inputs outside [0, 1] as logits and
apply a sigmoid, which breaks the masking that the "At1" figures need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_confusion_matrix,
)

# AutoML's thresholds: 0.00, 0.05, ... 0.95, then 0.96 ... 0.99.
THRESHOLDS = tuple(round(i * 0.05, 2) for i in range(20)) + (0.96, 0.97, 0.98, 0.99)
EPSILON = 1e-15  # log loss clips probabilities as scikit-learn does


def classification_evaluations(
    scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> list[dict[str, Any]]:
    """The overall evaluation, then one per label, as AutoML's ModelEvaluation bodies (without
    ``name`` and ``createTime``, which the caller adds).

    ``scores`` is (examples, labels) of probabilities: summing to 1 per row, with ``targets``
    each example's label index; or, for a MULTILABEL model, each label's own, with ``targets``
    (examples, labels) of 0 and 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    multilabel = targets.ndim == 2
    if scores.ndim != 2 or scores.shape[1] != len(labels) or len(targets) != len(scores):
        raise ValueError(
            f"scores {scores.shape} do not match {len(targets)} targets, {len(labels)} labels"
        )
    truth = truth_of(targets, len(labels))
    best = one_hot_best(scores)
    pooled: dict[str, Any] = binary_metrics(scores.ravel(), truth.ravel(), best.ravel())
    if multilabel:
        pooled["logLoss"] = binary_log_loss(scores.ravel(), truth.ravel())
    else:
        pooled["logLoss"] = multiclass_log_loss(scores, targets)
        pooled["confusionMatrix"] = confusion_matrix(scores, targets, labels)
    overall = {
        "annotationSpecId": "",
        "displayName": "",
        "evaluatedExampleCount": len(targets),
        "classificationEvaluationMetrics": pooled,
    }
    per_label = [
        {
            "annotationSpecId": str(index),
            "displayName": label,
            "evaluatedExampleCount": int(truth[:, index].sum()),
            "classificationEvaluationMetrics": {
                **binary_metrics(scores[:, index], truth[:, index], best[:, index]),
                "logLoss": binary_log_loss(scores[:, index], truth[:, index]),
            },
        }
        for index, label in enumerate(labels)
    ]
    return [overall, *per_label]


def truth_of(targets: np.ndarray, num_labels: int) -> np.ndarray:
    """(examples, labels), True where a label is true: a MULTILABEL model's targets are such rows
    already (0 and 1), a MULTICLASS model's are label indices."""
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return targets.astype(bool)
    return np.eye(num_labels, dtype=bool)[targets.astype(np.int64)]


def exact_match(scores: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> float:
    """The share of examples whose labels scored at or over ``threshold`` are exactly their true
    labels: a MULTILABEL model's accuracy."""
    truth = truth_of(targets, scores.shape[1])
    return float(np.mean(((scores >= threshold) == truth).all(axis=1))) if len(truth) else 0.0


def one_hot_best(scores: np.ndarray) -> np.ndarray:
    """True where a label is its example's best (the first one on ties)."""
    return np.eye(scores.shape[1], dtype=bool)[scores.argmax(axis=1)]


def binary_metrics(scores: np.ndarray, truth: np.ndarray, best: np.ndarray) -> dict[str, Any]:
    preds, target = torch.from_numpy(scores), torch.from_numpy(truth.astype(np.int64))
    has_both = 0 < truth.sum() < truth.size  # the areas are undefined with one class only
    return {
        "auPrc": _area(binary_average_precision(preds, target)) if truth.any() else 0.0,
        "auRoc": _area(binary_auroc(preds, target)) if has_both else 0.0,
        "confidenceMetricsEntry": [
            confidence_entry(scores, truth, best, threshold) for threshold in THRESHOLDS
        ],
    }


def _area(value: torch.Tensor) -> float:
    """An area under a curve, at most 1: torchmetrics sums in float32 whatever it is given,
    and scores that separate perfectly came to 1.0000001."""
    return min(1.0, float(value))


def confidence_entry(
    scores: np.ndarray, truth: np.ndarray, best: np.ndarray, threshold: float
) -> dict[str, Any]:
    predicted = scores >= threshold
    counts = _counts(predicted, truth)
    counts_at_1 = _counts(predicted & best, truth)
    entry: dict[str, Any] = {"confidenceThreshold": threshold}
    entry.update(_rates(counts))
    entry.update({f"{name}At1": value for name, value in _rates(counts_at_1).items()})
    tp, fp, fn, tn = counts
    entry.update(
        truePositiveCount=str(tp),
        falsePositiveCount=str(fp),
        falseNegativeCount=str(fn),
        trueNegativeCount=str(tn),
    )
    return entry


def _counts(predicted: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    tp = int((predicted & truth).sum())
    fp = int((predicted & ~truth).sum())
    fn = int((~predicted & truth).sum())
    tn = int((~predicted & ~truth).sum())
    return tp, fp, fn, tn


def _rates(counts: tuple[int, int, int, int]) -> dict[str, float]:
    tp, fp, fn, tn = counts
    recall = _ratio(tp, tp + fn)
    # AutoML reports precision 1 when nothing is predicted: no prediction was wrong.
    precision = _ratio(tp, tp + fp, empty=1.0)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "recall": recall,
        "precision": precision,
        "falsePositiveRate": _ratio(fp, fp + tn),
        "f1Score": f1,
    }


def _ratio(numerator: float, denominator: float, empty: float = 0.0) -> float:
    return float(numerator / denominator) if denominator else empty


def multiclass_log_loss(scores: np.ndarray, targets: np.ndarray) -> float:
    picked = np.clip(scores[np.arange(len(targets)), targets], EPSILON, 1.0)
    return float(-np.log(picked).mean())


def binary_log_loss(scores: np.ndarray, truth: np.ndarray) -> float:
    p = np.clip(scores, EPSILON, 1 - EPSILON)
    return float(-np.where(truth, np.log(p), np.log(1 - p)).mean())


def confusion_matrix(
    scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> dict[str, Any]:
    """Rows are true labels, columns predicted (best-scoring) labels, in ``labels`` order."""
    matrix = multiclass_confusion_matrix(
        torch.from_numpy(scores.argmax(axis=1)), torch.from_numpy(targets), len(labels)
    )
    return {
        "annotationSpecId": [str(i) for i in range(len(labels))],
        "displayName": list(labels),
        "row": [{"exampleCount": [int(n) for n in row]} for row in matrix.tolist()],
    }


def accuracy(evaluation: dict[str, Any]) -> float:
    """Top-1 accuracy of an overall evaluation: its recall at 1 with no threshold."""
    entries = evaluation["classificationEvaluationMetrics"]["confidenceMetricsEntry"]
    return next(e["recallAt1"] for e in entries if e["confidenceThreshold"] == 0.0)
