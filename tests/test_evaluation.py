"""Classification evaluation: AutoML's figures checked against scikit-learn, and the plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics

from evaluation.classification import THRESHOLDS, accuracy, classification_evaluations
from evaluation.plots import confusion_matrix_png, image_grid_png, precision_recall_png

LABELS = ["cat", "dog", "fox"]
# Six examples, three labels, hand-built: two mistakes (rows 2 and 5), one close call.
SCORES = np.array(
    [
        [0.80, 0.15, 0.05],
        [0.60, 0.30, 0.10],
        [0.30, 0.60, 0.10],  # a cat taken for a dog
        [0.10, 0.70, 0.20],
        [0.05, 0.05, 0.90],
        [0.40, 0.35, 0.25],  # a fox taken for a cat
    ]
)
TARGETS = np.array([0, 0, 0, 1, 2, 2])


@pytest.fixture(scope="module")
def evaluations() -> list[dict]:
    return classification_evaluations(SCORES, TARGETS, LABELS)


def entry_at(evaluation: dict, threshold: float) -> dict:
    entries = evaluation["classificationEvaluationMetrics"]["confidenceMetricsEntry"]
    return next(e for e in entries if e["confidenceThreshold"] == threshold)


def test_thresholds_are_automls() -> None:
    assert THRESHOLDS[:3] == (0.0, 0.05, 0.1) and THRESHOLDS[19] == 0.95
    assert THRESHOLDS[-4:] == (0.96, 0.97, 0.98, 0.99) and len(THRESHOLDS) == 24


def test_overall_figures_match_scikit_learn(evaluations: list[dict]) -> None:
    overall = evaluations[0]
    figures = overall["classificationEvaluationMetrics"]
    truth = np.eye(3, dtype=int)[TARGETS]
    assert overall["evaluatedExampleCount"] == 6 and overall["annotationSpecId"] == ""
    assert figures["auPrc"] == pytest.approx(
        metrics.average_precision_score(truth.ravel(), SCORES.ravel())
    )
    assert figures["auRoc"] == pytest.approx(metrics.roc_auc_score(truth.ravel(), SCORES.ravel()))
    assert figures["logLoss"] == pytest.approx(metrics.log_loss(TARGETS, SCORES))
    for threshold in (0.0, 0.3, 0.5, 0.95):
        entry = entry_at(overall, threshold)
        predicted = SCORES.ravel() >= threshold
        assert entry["precision"] == pytest.approx(
            metrics.precision_score(truth.ravel(), predicted, zero_division=1.0)
        )
        assert entry["recall"] == pytest.approx(metrics.recall_score(truth.ravel(), predicted))
        assert entry["f1Score"] == pytest.approx(metrics.f1_score(truth.ravel(), predicted))
    assert accuracy(overall) == pytest.approx(metrics.accuracy_score(TARGETS, SCORES.argmax(1)))


def test_counts_and_at_1_by_hand(evaluations: list[dict]) -> None:
    entry = entry_at(evaluations[0], 0.3)
    # Scores >= 0.3: rows 0 (cat), 1 (cat, dog), 2 (cat, dog), 3 (dog), 4 (fox), 5 (cat, dog)
    # = 9 predictions, of which true: rows 0, 1, 2 cat, row 3 dog, row 4 fox = 5; missed: row 5
    # fox (0.25); the other 18 - 5 - 4 - 1 = 8 pairs are true negatives.
    assert (entry["truePositiveCount"], entry["falsePositiveCount"]) == ("5", "4")
    assert (entry["falseNegativeCount"], entry["trueNegativeCount"]) == ("1", "8")
    # At 1: only each row's best label, if >= 0.3: 6 predictions, right in rows 0, 1, 3, 4.
    assert entry["precisionAt1"] == pytest.approx(4 / 6)
    assert entry["recallAt1"] == pytest.approx(4 / 6)
    assert entry["falsePositiveRateAt1"] == pytest.approx(2 / 12)
    # Above every score nothing is predicted: precision 1 by AutoML's convention, recall 0.
    top = entry_at(evaluations[0], 0.99)
    assert (top["precision"], top["recall"], top["truePositiveCount"]) == (1.0, 0.0, "0")


def test_confusion_matrix_matches_scikit_learn(evaluations: list[dict]) -> None:
    matrix = evaluations[0]["classificationEvaluationMetrics"]["confusionMatrix"]
    assert matrix["displayName"] == LABELS and matrix["annotationSpecId"] == ["0", "1", "2"]
    rows = [row["exampleCount"] for row in matrix["row"]]
    assert rows == metrics.confusion_matrix(TARGETS, SCORES.argmax(1)).tolist()


def test_per_label_evaluations_are_one_vs_rest(evaluations: list[dict]) -> None:
    assert [e["displayName"] for e in evaluations[1:]] == LABELS
    cat = evaluations[1]
    assert cat["annotationSpecId"] == "0" and cat["evaluatedExampleCount"] == 3
    figures = cat["classificationEvaluationMetrics"]
    is_cat = TARGETS == 0
    assert figures["auPrc"] == pytest.approx(metrics.average_precision_score(is_cat, SCORES[:, 0]))
    assert figures["auRoc"] == pytest.approx(metrics.roc_auc_score(is_cat, SCORES[:, 0]))
    assert figures["logLoss"] == pytest.approx(metrics.log_loss(is_cat, SCORES[:, 0]))
    entry = entry_at(cat, 0.5)
    assert entry["precision"] == pytest.approx(metrics.precision_score(is_cat, SCORES[:, 0] >= 0.5))
    assert "confusionMatrix" not in figures


def test_areas_of_scores_that_separate_perfectly_are_one_not_more() -> None:
    """torchmetrics sums in float32: of these 32 draws, 9 gave an auRoc of 1.0000001 and one an
    auPrc of 1.0000001."""
    from evaluation.classification import binary_metrics

    rng = np.random.default_rng(0)
    for _ in range(32):
        truth = rng.random(264) < 0.4
        scores = np.where(truth, rng.uniform(0.6, 1, 264), rng.uniform(0, 0.4, 264))
        figures = binary_metrics(scores.astype(np.float32), truth, truth)
        assert 1 - 1e-6 < figures["auRoc"] <= 1.0 and 1 - 1e-6 < figures["auPrc"] <= 1.0


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        classification_evaluations(SCORES[:, :2], TARGETS, LABELS)


def is_png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        return image.format == "PNG" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_valid_png_files(tmp_path: Path, evaluations: list[dict]) -> None:
    matrix = [
        r["exampleCount"]
        for r in evaluations[0]["classificationEvaluationMetrics"]["confusionMatrix"]["row"]
    ]
    images = [np.full((16, 16, 3), i * 40, dtype=np.uint8) for i in range(5)]
    written = [
        precision_recall_png(SCORES, TARGETS, LABELS, tmp_path / "pr.png"),
        confusion_matrix_png(np.array(matrix), LABELS, tmp_path / "confusion.png"),
        image_grid_png(images, [f"image {i}" for i in range(5)], tmp_path / "grid.png"),
        image_grid_png([], [], tmp_path / "empty.png"),
    ]
    assert all(is_png(path) for path in written)


# A MULTILABEL model's: each label scored on its own; an example may have several true labels,
# or none (the last).
MULTI_SCORES = np.array(
    [
        [0.90, 0.80, 0.10],
        [0.20, 0.70, 0.60],  # fox missed (0.60 over 0.5, but not true), dog right
        [0.70, 0.10, 0.40],
        [0.30, 0.30, 0.80],
        [0.10, 0.20, 0.30],  # no label, none said
    ]
)
MULTI_TARGETS = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=np.float32)


def test_a_multilabel_evaluation_pools_every_pair_and_has_no_confusion_matrix() -> None:
    from evaluation.classification import exact_match

    overall, *per_label = classification_evaluations(MULTI_SCORES, MULTI_TARGETS, LABELS)
    figures = overall["classificationEvaluationMetrics"]
    assert "confusionMatrix" not in figures  # AutoML gives none for MULTILABEL
    assert overall["evaluatedExampleCount"] == 5
    truth = MULTI_TARGETS.astype(int)
    assert figures["auPrc"] == pytest.approx(
        metrics.average_precision_score(truth, MULTI_SCORES, average="micro")
    )
    assert figures["logLoss"] == pytest.approx(
        metrics.log_loss(truth.ravel(), MULTI_SCORES.ravel())
    )
    entry = entry_at(overall, 0.5)
    predicted = MULTI_SCORES >= 0.5
    assert entry["precision"] == pytest.approx(
        metrics.precision_score(truth, predicted, average="micro")
    )
    assert entry["recall"] == pytest.approx(metrics.recall_score(truth, predicted, average="micro"))
    assert entry["f1Score"] == pytest.approx(metrics.f1_score(truth, predicted, average="micro"))
    # Per label: that label's column alone.
    fox = per_label[2]
    assert fox["displayName"] == "fox" and fox["evaluatedExampleCount"] == 2
    assert fox["classificationEvaluationMetrics"]["auPrc"] == pytest.approx(
        metrics.average_precision_score(truth[:, 2], MULTI_SCORES[:, 2])
    )
    # Rows 0, 3 and 4 get exactly their labels at 0.5; row 1 says fox too, row 2 misses fox.
    assert exact_match(MULTI_SCORES, MULTI_TARGETS) == pytest.approx(
        metrics.accuracy_score(truth, predicted)
    ) == pytest.approx(3 / 5)  # fmt: skip


def test_a_multilabel_evaluation_parses_as_automls(tmp_path: Path) -> None:
    from google.cloud.automl_v1 import types

    from tests.test_automl_conformance import strict

    for body in classification_evaluations(MULTI_SCORES, MULTI_TARGETS, LABELS):
        strict(types.ModelEvaluation, {"name": "x", **body})
    written = precision_recall_png(MULTI_SCORES, MULTI_TARGETS, LABELS, tmp_path / "pr.png")
    assert is_png(written)
