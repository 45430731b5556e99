"""AutoML ModelEvaluation resources for object detection, from predicted and true boxes.

Inputs, one mapping per image: predictions with ``boxes`` (N, 4; x_min, y_min, x_max, y_max in
[0, 1]), ``scores`` (N) and ``labels`` (N, 0-based label indices); truths with ``boxes`` and
``labels``. NumPy arrays, CPU tensors or lists all do.

The mean average precisions come from torchmetrics' MeanAveragePrecision (pycocotools: COCO's
101-point interpolated AP, up to 100 detections per image), per IoU threshold from 0.50 to 0.95;
``boundingBoxMeanAveragePrecision`` is their average (COCO's mAP@[.5:.95]). The precision,
recall and F1 per confidence threshold come from greedy matching, as COCO matches: predictions in
decreasing score order each take the unmatched true box of their label with the highest IoU, if
that IoU reaches the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# COCO's IoU thresholds 0.50, 0.55, ... 0.95; AutoML reports one entry per threshold.
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# AutoML's confidence thresholds for detection: 0.05, 0.10, ... 0.95, then 0.96 ... 0.99.
CONFIDENCE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.96, 0.97, 0.98, 0.99)
MAX_DETECTIONS = 100
METRICS_KEY = "imageObjectDetectionEvaluationMetrics"


def detection_evaluations(
    predictions: Sequence[Mapping[str, Any]],
    truths: Sequence[Mapping[str, Any]],
    labels: Sequence[str],
) -> list[dict[str, Any]]:
    """The overall evaluation, then one per label, as AutoML's ModelEvaluation bodies (without
    ``name`` and ``createTime``, which the caller adds)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    preds = [_arrays(p, with_scores=True) for p in predictions]
    trues = [_arrays(t, with_scores=False) for t in truths]
    per_threshold, per_class = mean_average_precisions(preds, trues, len(labels))
    matches = {iou: match_detections(preds, trues, iou) for iou in IOU_THRESHOLDS}
    true_labels = [t["labels"] for t in trues]
    overall = {
        "annotationSpecId": "",
        "displayName": "",
        "evaluatedExampleCount": len(trues),
        METRICS_KEY: _metrics(per_threshold, matches, true_labels, label=None),
    }
    per_label = [
        {
            "annotationSpecId": str(index),
            "displayName": name,
            "evaluatedExampleCount": sum(int((t == index).any()) for t in true_labels),
            METRICS_KEY: _metrics(per_class[index], matches, true_labels, label=index),
        }
        for index, name in enumerate(labels)
    ]
    return [overall, *per_label]


def mean_average_precision(evaluation: Mapping[str, Any], iou_threshold: float | None) -> float:
    """An evaluation's mAP at one IoU threshold (e.g. 0.5), or averaged over all (None)."""
    metrics = evaluation[METRICS_KEY]
    if iou_threshold is None:
        return metrics["boundingBoxMeanAveragePrecision"]
    entries = metrics["boundingBoxMetricsEntries"]
    return next(e["meanAveragePrecision"] for e in entries if e["iouThreshold"] == iou_threshold)


def _arrays(image: Mapping[str, Any], with_scores: bool) -> dict[str, np.ndarray]:
    arrays = {
        "boxes": np.asarray(image["boxes"], dtype=np.float64).reshape(-1, 4),
        "labels": np.asarray(image["labels"], dtype=np.int64).reshape(-1),
    }
    if with_scores:
        arrays["scores"] = np.asarray(image["scores"], dtype=np.float64).reshape(-1)
    return arrays


def mean_average_precisions(
    preds: Sequence[dict[str, np.ndarray]], trues: Sequence[dict[str, np.ndarray]], classes: int
) -> tuple[list[float], list[list[float]]]:
    """mAP per IoU threshold, overall and per class (0 where a class has no true box)."""
    import torch  # torchmetrics and torch cost seconds to import: only when evaluating
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=list(IOU_THRESHOLDS),
        max_detection_thresholds=[1, 10, MAX_DETECTIONS],
        # The per-class figures come from the precision table below: class_metrics=True would
        # run COCO's evaluation once more for every class.
        class_metrics=False,
        extended_summary=True,
        backend="pycocotools",
    )
    metric.update(
        [{key: torch.from_numpy(value) for key, value in p.items()} for p in preds],
        [{key: torch.from_numpy(value) for key, value in t.items()} for t in trues],
    )
    results = metric.compute()
    # COCO's precision table: (IoU thresholds, 101 recall points, classes, area ranges, max
    # detections); -1 marks classes without a true box. Area range 0 is "all", the last max
    # detections is 100: COCO's mAP averages the valid cells of this slice.
    table = np.asarray(results["precision"], dtype=np.float64)[:, :, :, 0, -1]
    overall = [_valid_mean(table[t]) for t in range(len(IOU_THRESHOLDS))]
    per_class = [[0.0] * len(IOU_THRESHOLDS) for _ in range(classes)]
    for column, class_id in enumerate(np.asarray(results["classes"]).reshape(-1).tolist()):
        if 0 <= class_id < classes:
            per_class[class_id] = [_valid_mean(table[t, :, column]) for t in range(table.shape[0])]
    return overall, per_class


def _valid_mean(cells: np.ndarray) -> float:
    valid = cells[cells > -1]
    return float(valid.mean()) if valid.size else 0.0


def match_detections(
    preds: Sequence[dict[str, np.ndarray]], trues: Sequence[dict[str, np.ndarray]], iou: float
) -> dict[str, np.ndarray]:
    """Every prediction's score, label and whether greedy matching at ``iou`` made it a hit.

    A prediction's match depends only on the better-scored ones, so one matching serves every
    confidence threshold: the hits above a threshold are the hits of the predictions above it.
    """
    scores, labels, hits = [], [], []
    for pred, true in zip(preds, trues, strict=True):
        hits.append(_match_image(pred, true, iou))
        scores.append(pred["scores"])
        labels.append(pred["labels"])
    return {
        "scores": np.concatenate(scores) if scores else np.zeros(0),
        "labels": np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        "hits": np.concatenate(hits) if hits else np.zeros(0, dtype=bool),
    }


def _match_image(
    pred: dict[str, np.ndarray], true: dict[str, np.ndarray], iou: float
) -> np.ndarray:
    hits = np.zeros(len(pred["scores"]), dtype=bool)
    overlaps = box_iou(pred["boxes"], true["boxes"])
    # Which true boxes each prediction could take; most low-scored predictions can take none,
    # and only the others need the loop in score order.
    eligible = (overlaps >= iou) & (pred["labels"][:, None] == true["labels"][None, :])
    rows = np.flatnonzero(eligible.any(axis=1))
    taken = np.zeros(len(true["boxes"]), dtype=bool)
    for index in rows[np.argsort(-pred["scores"][rows], kind="stable")]:
        candidates = eligible[index] & ~taken
        if candidates.any():
            best = int(np.argmax(np.where(candidates, overlaps[index], -1.0)))
            taken[best] = hits[index] = True
    return hits


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), x_min y_min x_max y_max."""
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    intersection = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area_a = (a[:, 2:] - a[:, :2]).prod(axis=1)
    area_b = (b[:, 2:] - b[:, :2]).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _metrics(
    maps: Sequence[float],
    matches: Mapping[float, dict[str, np.ndarray]],
    true_labels: Sequence[np.ndarray],
    label: int | None,
) -> dict[str, Any]:
    truth_count = sum(int(len(t) if label is None else (t == label).sum()) for t in true_labels)
    entries = []
    for iou, average_precision in zip(IOU_THRESHOLDS, maps, strict=True):
        match = matches[iou]
        keep = np.ones(len(match["scores"]), bool) if label is None else match["labels"] == label
        entries.append(
            {
                "iouThreshold": iou,
                "meanAveragePrecision": average_precision,
                "confidenceMetricsEntries": confidence_entries(
                    match["scores"][keep], match["hits"][keep], truth_count
                ),
            }
        )
    return {
        "evaluatedBoundingBoxCount": truth_count,
        "boundingBoxMetricsEntries": entries,
        "boundingBoxMeanAveragePrecision": float(np.mean(maps)),
    }


def confidence_entries(
    scores: np.ndarray, hits: np.ndarray, truth_count: int
) -> list[dict[str, float]]:
    entries = []
    for threshold in CONFIDENCE_THRESHOLDS:
        kept = scores >= threshold
        true_positives, predicted = int(hits[kept].sum()), int(kept.sum())
        recall = true_positives / truth_count if truth_count else 0.0
        # As for classification: precision 1 when nothing is predicted, no prediction was wrong.
        precision = true_positives / predicted if predicted else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        entries.append(
            {
                "confidenceThreshold": threshold,
                "recall": recall,
                "precision": precision,
                "f1Score": f1,
            }
        )
    return entries
