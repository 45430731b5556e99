"""Detection evaluation (mAP checked on a case worked by hand), its plots, and the batch
prediction records (JSONL rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evaluation.detection import (
    CONFIDENCE_THRESHOLDS,
    IOU_THRESHOLDS,
    METRICS_KEY,
    box_iou,
    detection_evaluations,
    mean_average_precision,
)
from evaluation.detection_plots import detection_grid_png, detection_precision_recall_png
from trainer.errors import UserError
from trainer.tasks.object_detection.predict import (
    check_detection_options,
    detection_record,
    jsonl_line,
    output_name,
    record_from_rows,
)

REPO = Path(__file__).resolve().parent.parent
LABELS = ["cat", "dog"]

# The hand-worked case. Two images, labels cat (0) and dog (1); boxes in [0, 1].
#
# image 1: true cat A = (0, 0, .5, .5), true dog B = (.5, .5, 1, 1)
#   p1 cat (0, 0, .5, .5)    score .88  IoU(A) = 1                   -> hit at every IoU
#   p2 cat (.5, 0, 1, .5)    score .77  overlaps no cat              -> miss
#   p3 dog (.5, .5, 1, .92)  score .72  IoU(B) = .5*.42/.25 = .84    -> hit up to IoU .80
# image 2: true cat C = (.2, .2, .6, .6)
#   p4 cat (.2, .2, .6, .6)  score .63  IoU(C) = 1                   -> hit at every IoU
#   p5 dog (0, 0, .2, .2)    score .93  no true dog here             -> miss
PREDICTIONS = [
    {
        "boxes": [[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0.5, 0.5, 1, 0.92]],
        "scores": [0.88, 0.77, 0.72],
        "labels": [0, 0, 1],
    },
    {"boxes": [[0.2, 0.2, 0.6, 0.6], [0, 0, 0.2, 0.2]], "scores": [0.63, 0.93], "labels": [0, 1]},
]
TRUTHS = [
    {"boxes": [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], "labels": [0, 1]},
    {"boxes": [[0.2, 0.2, 0.6, 0.6]], "labels": [0]},
]

# COCO's AP: precision at the 101 recall points 0, .01, ... 1, each the best precision at that
# recall or beyond, averaged.
#
# cat, 2 true boxes, at every IoU threshold: by score p1 hit (P 1, R .5), p2 miss (P .5, R .5),
# p4 hit (P 2/3, R 1). Best precision at recall <= .5 is 1 (51 points: 0 ... .50), above .5 it
# is 2/3 (50 points: .51 ... 1): AP = (51 + 50 * 2/3) / 101 = 253/303 = 0.834983...
CAT_AP = 253 / 303
# dog, 1 true box: p5 miss (P 0, R 0), then p3 hit (P .5, R 1) while IoU .84 reaches the
# threshold (.50 ... .80, 7 thresholds): best precision at any recall is .5, AP = .5; at .85,
# .90, .95 nothing hits: AP = 0. Over the 10 thresholds: 7 * .5 / 10 = .35.
DOG_AP_LOW, DOG_AP_HIGH = 0.5, 0.0
# Overall per threshold, the mean over the two labels: (253/303 + .5) / 2 = 0.667492 up to .80,
# 253/303 / 2 = 0.417492 from .85; averaged over the 10 thresholds:
# (7 * 0.667492 + 3 * 0.417492) / 10 = 0.592492.
MAP_LOW, MAP_HIGH = (CAT_AP + 0.5) / 2, CAT_AP / 2
MAP_50_95 = (7 * MAP_LOW + 3 * MAP_HIGH) / 10


def _entry(evaluation: dict, iou: float) -> dict:
    entries = evaluation[METRICS_KEY]["boundingBoxMetricsEntries"]
    return next(e for e in entries if e["iouThreshold"] == iou)


def _at(entry: dict, confidence: float) -> tuple[float, float, float]:
    point = next(
        p for p in entry["confidenceMetricsEntries"] if p["confidenceThreshold"] == confidence
    )
    return point["precision"], point["recall"], point["f1Score"]


@pytest.fixture(scope="module")
def evaluations() -> list[dict]:
    return detection_evaluations(PREDICTIONS, TRUTHS, LABELS)


def test_map_matches_the_hand_worked_case(evaluations: list[dict]) -> None:
    overall, cat, dog = evaluations
    assert mean_average_precision(overall, None) == pytest.approx(MAP_50_95, abs=1e-6)
    assert pytest.approx(0.592492, abs=1e-6) == MAP_50_95
    for iou in IOU_THRESHOLDS:
        low = iou <= 0.8
        assert mean_average_precision(overall, iou) == pytest.approx(
            MAP_LOW if low else MAP_HIGH, abs=1e-6
        )
        assert mean_average_precision(cat, iou) == pytest.approx(CAT_AP, abs=1e-6)
        assert mean_average_precision(dog, iou) == pytest.approx(
            DOG_AP_LOW if low else DOG_AP_HIGH, abs=1e-6
        )
    assert mean_average_precision(overall, 0.5) == pytest.approx(0.667492, abs=1e-6)
    assert mean_average_precision(dog, None) == pytest.approx(0.35, abs=1e-6)


def test_evaluation_shape_and_counts(evaluations: list[dict]) -> None:
    overall, cat, dog = evaluations
    assert [e["annotationSpecId"] for e in evaluations] == ["", "0", "1"]
    assert [e["displayName"] for e in evaluations] == ["", "cat", "dog"]
    # examples: images evaluated; for a label, the images where it is truly present
    assert [e["evaluatedExampleCount"] for e in evaluations] == [2, 2, 1]
    assert [e[METRICS_KEY]["evaluatedBoundingBoxCount"] for e in evaluations] == [3, 2, 1]
    entries = overall[METRICS_KEY]["boundingBoxMetricsEntries"]
    assert [e["iouThreshold"] for e in entries] == list(IOU_THRESHOLDS)
    assert {0.5, 0.75} <= set(IOU_THRESHOLDS)
    thresholds = [p["confidenceThreshold"] for p in entries[0]["confidenceMetricsEntries"]]
    assert thresholds == list(CONFIDENCE_THRESHOLDS)
    assert thresholds[0] == 0.05 and thresholds[-5:] == [0.95, 0.96, 0.97, 0.98, 0.99]
    json.dumps(evaluations)  # plain JSON types only


def test_confidence_entries_match_greedy_matching_by_hand(evaluations: list[dict]) -> None:
    overall, cat, dog = evaluations
    at_50 = _entry(overall, 0.5)
    # score >= .60: all five predictions, hits p1 p3 p4: P 3/5, R 3/3, F1 2*.6*1/1.6 = .75
    assert _at(at_50, 0.6) == pytest.approx((0.6, 1.0, 0.75))
    # >= .65 drops p4 (.63): hits p1 p3 of four: P .5, R 2/3, F1 2*.5*(2/3)/(7/6) = 4/7
    assert _at(at_50, 0.65) == pytest.approx((0.5, 2 / 3, 4 / 7))
    # >= .75 keeps p5 p1 p2: one hit of three: P 1/3, R 1/3, F1 1/3
    assert _at(at_50, 0.75) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # >= .90 keeps p5 only, a miss: P 0, R 0, F1 0
    assert _at(at_50, 0.9) == pytest.approx((0.0, 0.0, 0.0))
    # >= .95 keeps nothing: no prediction was wrong, P 1 (as for classification), R 0
    assert _at(at_50, 0.95) == pytest.approx((1.0, 0.0, 0.0))
    # at IoU .85 p3 misses too: >= .60 hits p1 p4 of five: P .4, R 2/3, F1 2*.4*(2/3)/(16/15) = .5
    assert _at(_entry(overall, 0.85), 0.6) == pytest.approx((0.4, 2 / 3, 0.5))
    # per label: cat >= .60 is p1 p2 p4, two hits: P 2/3, R 1, F1 .8
    assert _at(_entry(cat, 0.5), 0.6) == pytest.approx((2 / 3, 1.0, 0.8))
    # dog >= .70 is p5 p3, one hit: P .5, R 1; >= .75 only p5: P 0, R 0
    assert _at(_entry(dog, 0.5), 0.7) == pytest.approx((0.5, 1.0, 2 / 3))
    assert _at(_entry(dog, 0.5), 0.75) == pytest.approx((0.0, 0.0, 0.0))


def test_a_second_detection_of_the_same_object_is_a_false_positive() -> None:
    truth = [{"boxes": [[0.1, 0.1, 0.5, 0.5]], "labels": [0]}]
    twice = [{"boxes": [[0.1, 0.1, 0.5, 0.5]] * 2, "scores": [0.9, 0.8], "labels": [0, 0]}]
    overall = detection_evaluations(twice, truth, ["cat"])[0]
    assert _at(_entry(overall, 0.5), 0.5) == pytest.approx((0.5, 1.0, 2 / 3))
    # the duplicate ranks below the hit, so COCO's AP is still perfect
    assert mean_average_precision(overall, 0.5) == pytest.approx(1.0)


def test_a_wrong_label_never_matches_and_empty_inputs_give_zeros() -> None:
    truth = [{"boxes": [[0.1, 0.1, 0.5, 0.5]], "labels": [0]}]
    wrong = [{"boxes": [[0.1, 0.1, 0.5, 0.5]], "scores": [0.9], "labels": [1]}]
    overall, cat, dog = detection_evaluations(wrong, truth, LABELS)
    assert mean_average_precision(overall, 0.5) == 0.0
    assert _at(_entry(overall, 0.5), 0.5) == (0.0, 0.0, 0.0)
    assert dog["evaluatedExampleCount"] == 0 and mean_average_precision(dog, None) == 0.0
    nothing = [{"boxes": [], "scores": [], "labels": []}]
    empty = detection_evaluations(nothing, [{"boxes": [], "labels": []}], LABELS)[0]
    assert empty[METRICS_KEY]["evaluatedBoundingBoxCount"] == 0
    assert mean_average_precision(empty, None) == 0.0


def test_box_iou() -> None:
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1]], dtype=float)
    b = np.array([[1, 1, 3, 3], [5, 5, 6, 6]], dtype=float)
    # overlap 1x1 = 1, union 4 + 4 - 1 = 7; touching at a corner or apart: 0
    assert box_iou(a, b) == pytest.approx(np.array([[1 / 7, 0], [0, 0]]))
    assert box_iou(a, np.zeros((0, 4))).shape == (2, 0)


def test_plots_are_written(tmp_path: Path, evaluations: list[dict]) -> None:
    curve = detection_precision_recall_png(evaluations, tmp_path / "pr.png")
    images = [np.full((40, 60, 3), 120, np.uint8), np.zeros((50, 50, 3), np.uint8)]
    grid = detection_grid_png(images, TRUTHS, PREDICTIONS, LABELS, tmp_path / "grid.png")
    empty = detection_grid_png([], [], [], LABELS, tmp_path / "empty.png")
    for path in (curve, grid, empty):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_never_imports_trainer() -> None:
    code = (
        "import sys, evaluation.detection, evaluation.detection_plots;"
        "sys.exit(any(m == 'trainer' or m.startswith('trainer.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# Batch prediction records.

BOXES = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.95], [-0.02, 0.0, 0.4, 1.03], [0.0, 0.1, 0.2, 0.3]]
SCORES = [0.4, 0.9, 0.65, 0.2]
CLASSES = [1, 0, 1, 0]


def test_record_is_automl_shaped_best_first() -> None:
    record = detection_record("gs://b/x.jpg", BOXES, CLASSES, SCORES, LABELS)
    assert record["ID"] == "gs://b/x.jpg"
    assert [a["imageObjectDetection"]["score"] for a in record["annotations"]] == [
        0.9, 0.65, 0.4, 0.2,
    ]  # fmt: skip
    best = record["annotations"][0]
    assert best == {
        "annotationSpecId": "0",
        "displayName": "cat",
        "imageObjectDetection": {
            "boundingBox": {"normalizedVertices": [{"x": 0.5, "y": 0.5}, {"x": 0.9, "y": 0.95}]},
            "score": 0.9,
        },
    }
    # vertices are clipped to the image
    clipped = record["annotations"][1]["imageObjectDetection"]["boundingBox"]
    assert clipped["normalizedVertices"] == [{"x": 0.0, "y": 0.0}, {"x": 0.4, "y": 1.0}]
    assert record["annotations"][1]["annotationSpecId"] == "1"
    line = jsonl_line(record)
    assert line.endswith("\n") and "\n" not in line[:-1]
    assert json.loads(line) == record


def test_score_threshold_and_box_count() -> None:
    kept = detection_record("x", BOXES, CLASSES, SCORES, LABELS, score_threshold=0.4)
    assert [a["imageObjectDetection"]["score"] for a in kept["annotations"]] == [0.9, 0.65, 0.4]
    capped = detection_record("x", BOXES, CLASSES, SCORES, LABELS, max_bounding_box_count=2)
    assert [a["imageObjectDetection"]["score"] for a in capped["annotations"]] == [0.9, 0.65]
    many = detection_record("x", [[0, 0, 1, 1]] * 150, [0] * 150, [0.5] * 150, LABELS)
    assert len(many["annotations"]) == 100  # AutoML's default cap
    none = detection_record("x", BOXES, CLASSES, SCORES, LABELS, score_threshold=0.95)
    assert none == {"ID": "x", "annotations": []}
    assert output_name(1) == "image_object_detection_1.jsonl"


def test_prediction_options_are_checked() -> None:
    check_detection_options(0.0, 1)
    with pytest.raises(UserError, match="--score-threshold=1.5"):
        check_detection_options(1.5, 100)
    with pytest.raises(UserError, match="--max-bounding-box-count=0"):
        check_detection_options(0.5, 0)
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        detection_record("x", BOXES[:2], [0], [0.5], LABELS)


def test_record_from_serving_rows_leaves_out_padding() -> None:
    rows = [[0.1, 0.2, 0.3, 0.4, 0.8, 1], [0.0, 0.0, 1.0, 1.0, 0.3, 0], [-1.0] * 6]
    record = record_from_rows("y.png", rows, LABELS, score_threshold=0.5)
    (only,) = record["annotations"]
    assert only["displayName"] == "dog" and only["imageObjectDetection"]["score"] == 0.8
    assert len(record_from_rows("y.png", rows, LABELS)["annotations"]) == 2
