"""SSD's post-processing of a TF Lite detector's outputs (tflite.py), in NumPy alone: what an app
of the package runs after the interpreter. It imports nothing of torch or of this project, so
that a process with only LiteRT and NumPy can run this file as it is (the tests do).

Written by hand because torchvision's (``SSD.postprocess_detections``, whose steps and figures
this follows) is torch, which a device running the package does not have.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def postprocess(outputs: list[np.ndarray], settings: dict[str, Any]) -> list[np.ndarray]:
    """SSD's post-processing of one image's ``boxes`` and ``scores`` (tflite.py's docstring):
    boxes (K, 4), scores (K,) best first, 0-based labels (K,). NumPy alone, as on a device:
    written here because torchvision's (torch) is what an app of the package does not have."""
    boxes, scores = outputs[0][0], outputs[1][0]
    found_boxes, found_scores, found_labels = [], [], []
    for label in range(1, scores.shape[1]):
        score = scores[:, label]
        keep = np.flatnonzero(score > settings["scoreThreshold"])
        keep = keep[np.argsort(-score[keep], kind="stable")][: settings["topkCandidates"]]
        kept = nms(boxes[keep], score[keep], settings["nmsIouThreshold"])
        found_boxes.append(boxes[keep][kept])
        found_scores.append(score[keep][kept])
        found_labels.append(np.full(len(kept), label - 1))
    all_scores = np.concatenate(found_scores)
    best = np.argsort(-all_scores, kind="stable")[: settings["maxDetections"]]
    return [np.concatenate(found_boxes)[best], all_scores[best], np.concatenate(found_labels)[best]]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression: indices kept, best first."""
    order, kept = np.argsort(-scores, kind="stable"), []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while len(order):
        best, rest = order[0], order[1:]
        kept.append(best)
        low = np.maximum(boxes[best, :2], boxes[rest, :2])
        high = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        overlap = np.prod(np.clip(high - low, 0, None), axis=1)
        iou = overlap / (areas[best] + areas[rest] - overlap)
        order = rest[iou <= threshold]
    return np.array(kept, dtype=np.int64)
