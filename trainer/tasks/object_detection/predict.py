"""Batch-prediction records for object detection, in AutoML's JSONL shape.

One line per image in ``image_object_detection_N.jsonl``:

    {"ID": "<the image as the input spelled it>",
     "annotations": [{"annotationSpecId": "<label index>", "displayName": "<label>",
                      "imageObjectDetection": {"boundingBox": {"normalizedVertices":
                          [{"x": x_min, "y": y_min}, {"x": x_max, "y": y_max}]},
                      "score": 0.97}}, ...]}

Best score first, at most ``max_bounding_box_count`` boxes, none under ``score_threshold``.
Pure Python: no torch, so the prediction job's writer and its tests stay light.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from trainer.errors import UserError
from trainer.tasks.object_detection import DEFAULT_MAX_BOUNDING_BOX_COUNT

OUTPUT_PREFIX = "image_object_detection"


def check_detection_options(score_threshold: float, max_bounding_box_count: int) -> None:
    """Refuse values AutoML would refuse, naming the flag."""
    if not 0.0 <= score_threshold <= 1.0:
        raise UserError(f"--score-threshold={score_threshold} must be between 0 and 1")
    if max_bounding_box_count < 1:
        raise UserError(
            f"--max-bounding-box-count={max_bounding_box_count} must be at least 1 "
            f"(default {DEFAULT_MAX_BOUNDING_BOX_COUNT})"
        )


def detection_record(
    image_id: str,
    boxes: Sequence[Sequence[float]],
    labels: Sequence[int],
    scores: Sequence[float],
    label_names: Sequence[str],
    score_threshold: float = 0.0,
    max_bounding_box_count: int = DEFAULT_MAX_BOUNDING_BOX_COUNT,
) -> dict[str, Any]:
    """One image's record. ``boxes`` are (x_min, y_min, x_max, y_max) in [0, 1], ``labels``
    0-based indices into ``label_names`` (the sorted labels the model was trained on)."""
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores")
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # stable on ties
    kept = [i for i in order if float(scores[i]) >= score_threshold][:max_bounding_box_count]
    return {
        "ID": image_id,
        "annotations": [
            annotation(boxes[i], int(labels[i]), float(scores[i]), label_names) for i in kept
        ],
    }


def record_from_rows(
    image_id: str,
    rows: Sequence[Sequence[float]],
    label_names: Sequence[str],
    score_threshold: float = 0.0,
    max_bounding_box_count: int = DEFAULT_MAX_BOUNDING_BOX_COUNT,
) -> dict[str, Any]:
    """One image's record from ServingDetector's rows (x_min, y_min, x_max, y_max, score,
    label index); padding rows (score -1) are left out."""
    used = [row for row in rows if float(row[4]) >= 0]
    return detection_record(
        image_id,
        [row[:4] for row in used],
        [int(row[5]) for row in used],
        [float(row[4]) for row in used],
        label_names,
        score_threshold,
        max_bounding_box_count,
    )


def annotation(
    box: Sequence[float], label: int, score: float, label_names: Sequence[str]
) -> dict[str, Any]:
    x_min, y_min, x_max, y_max = (min(max(float(v), 0.0), 1.0) for v in box)
    return {
        "annotationSpecId": str(label),
        "displayName": label_names[label],
        "imageObjectDetection": {
            "boundingBox": {
                "normalizedVertices": [{"x": x_min, "y": y_min}, {"x": x_max, "y": y_max}]
            },
            "score": score,
        },
    }


def jsonl_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def output_name(index: int) -> str:
    """The N-th output file's name (1-based, as AutoML numbers them)."""
    return f"{OUTPUT_PREFIX}_{index}.jsonl"


def detection_records(network: Any, labels: Sequence[str], threshold: float, max_boxes: int) -> Any:
    """(pixels, IDs) -> records, for trainer/data/prediction.py: the network as it serves
    (ServingDetector's rows) turned into AutoML's lines. Imports torch only when called."""
    from trainer.tasks.object_detection.module import ServingDetector

    serving = ServingDetector(network.eval())

    def records(pixels: Any, ids: list[str]) -> list[dict[str, Any]]:
        rows = serving(pixels).numpy()
        pairs = zip(ids, rows, strict=True)
        return [record_from_rows(i, r, labels, threshold, max_boxes) for i, r in pairs]

    return records


def detection_online(network: Any, labels: Sequence[str], transform: Any) -> Any:
    """A deployed detector (trainer.tasks.OnlineModel): batch prediction's rows, AutoML's payload
    of the boxes at or over the threshold (at most max_bounding_box_count), and AutoML Edge's
    TF Serving fields for every box the network keeps, best first."""
    from trainer.tasks import OnlineModel
    from trainer.tasks.object_detection.module import ServingDetector

    serving = ServingDetector(network.eval())

    def outputs(pixels: Any) -> list[Any]:
        return list(serving(pixels).cpu().numpy())

    def annotations(rows: Any, params: dict[str, float]) -> list[dict[str, Any]]:
        threshold, count = params["score_threshold"], int(params["max_bounding_box_count"])
        return record_from_rows("", rows, labels, threshold, count)["annotations"]

    def tf_serving(rows: Any) -> dict[str, Any]:
        found = record_from_rows("", rows, labels, 0.0, len(rows))["annotations"]
        boxes = [a["imageObjectDetection"]["boundingBox"]["normalizedVertices"] for a in found]
        return {  # TF's order of a box: y_min, x_min, y_max, x_max
            "detection_boxes": [[low["y"], low["x"], high["y"], high["x"]] for low, high in boxes],
            "detection_scores": [a["imageObjectDetection"]["score"] for a in found],
            "detection_classes": [int(a["annotationSpecId"]) for a in found],
            "detection_classes_as_text": [a["displayName"] for a in found],
            "num_detections": len(found),
        }

    params = {"score_threshold": 0.5, "max_bounding_box_count": DEFAULT_MAX_BOUNDING_BOX_COUNT}
    return OnlineModel(transform, outputs, annotations, tf_serving, params)
