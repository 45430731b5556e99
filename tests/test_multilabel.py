"""Multi-label image classification (AutoML's MULTILABEL datasets and models): a short real
training on generated shapes, one to three an image, and what it records."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FAST, Trained, read_json, run_trainer, train
from tests.test_automl_conformance import automl, parse_operation, strict
from tests.test_resume import refusal

BUDGET = 6  # milli-node-hours: 21.6 s


@pytest.fixture(scope="session")
def multilabel_csv(tmp_path_factory) -> Path:
    from trainer.tasks.image_classification.demo import write_multilabel_shapes

    return write_multilabel_shapes(tmp_path_factory.mktemp("multilabel"), 120, 32, seed=5)


@pytest.fixture(scope="session")
def multilabel_model(tmp_path_factory, trainer_home: Path, multilabel_csv: Path) -> Trained:
    cwd = tmp_path_factory.mktemp("multilabel_run")
    model, run_dir = train(
        cwd, trainer_home, *FAST, f"dataset.path={multilabel_csv}", "display_name=tags",
        f"budget.train_budget_milli_node_hours={BUDGET}", "budget.disable_early_stopping=true",
        # FAST judges convergence on val_accuracy, which a MULTILABEL model has not: the default.
        "task.convergence_monitor=val_loss", "task.convergence_monitor_mode=min",
    )  # fmt: skip
    return Trained(cwd, {"mobile-low-latency-1": model}, {"mobile-low-latency-1": run_dir}, BUDGET)


def test_a_multilabel_dataset_trains_scoring_each_label_on_its_own(
    multilabel_model: Trained,
) -> None:
    cwd, run_dir, model, budget = multilabel_model.only()
    types = automl("image_classification")
    strict(types.Model, model)
    parse_operation("image_classification", read_json(run_dir / "operation.json"), "Model")
    details = read_json(run_dir / "model_details.json")
    assert 0 < int(details["trainCostMilliNodeHours"]) <= budget
    # auto settled as MULTILABEL, and the monitors followed (conf/task's multilabel).
    config = read_json(run_dir / "state.json")["config"]
    assert config["dataset"]["classification_type"] == "MULTILABEL"
    assert (config["task"]["monitor"], config["task"]["monitor_mode"]) == ("val_auprc", "max")
    assert config["task"]["convergence_monitor"] == "val_loss"
    metrics = read_json(run_dir / "metrics.json")
    assert {"test_auprc", "test_exact_match", "test_loss", "best_val_auprc"} <= set(metrics)
    assert "test_accuracy" not in metrics and 0 < metrics["test_auprc"] <= 1

    # The evaluation: AutoML's MULTILABEL figures, no confusion matrix, its plots.
    (evaluation_file,) = run_dir.glob("evaluations/*/evaluation.json")
    overall, *per_label = read_json(evaluation_file)
    for body in (overall, *per_label):
        strict(types.ModelEvaluation, body)
    figures = overall["classificationEvaluationMetrics"]
    assert "confusionMatrix" not in figures
    assert figures["auPrc"] == pytest.approx(metrics["test_auprc"], abs=1e-4)
    assert [e["displayName"] for e in per_label] == ["circle", "cross", "square", "triangle"]
    plots = {p.name for p in evaluation_file.parent.glob("*.png")}
    assert plots == {"precision_recall.png", "worst_examples.png"}


def test_batch_prediction_gives_every_label_at_or_over_the_threshold_as_its_sigmoid(
    multilabel_model: Trained, multilabel_csv: Path, monkeypatch
) -> None:
    import numpy as np
    import torch

    from tests.test_export import stored
    from tests.test_predict import predict, read_jsonl
    from trainer.data.images import eval_transform
    from trainer.data.manifest import TEST, read_dataset
    from trainer.stored_model import load_network
    from trainer.tasks.image_classification.export import read_rgb

    cwd, _, model, _ = multilabel_model.only()
    items = read_dataset(multilabel_csv).split(TEST)[:6]
    model_id = model["name"].rsplit("/", 1)[1]
    result = predict(cwd, model_id, [str(item.path) for item in items], "--score-threshold", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(sorted(Path(result.stdout.strip()).glob("image_classification_*.jsonl")))
    # The scores: each label's sigmoid, computed here from the stored network.
    trained = stored(multilabel_model, model, monkeypatch)
    settings = trained.settings
    transform = eval_transform(settings.model.size, settings.data.mean, settings.data.std)
    with torch.no_grad():
        images = torch.stack([transform(read_rgb(item.path)) for item in items])
        want = load_network(trained)(images).sigmoid().numpy()
    for record, expected in zip(records, want, strict=True):
        got = {a["displayName"]: a["classification"]["score"] for a in record["annotations"]}
        assert len(got) == len(trained.labels)  # threshold 0: every label, best first
        assert list(got.values()) == sorted(got.values(), reverse=True)
        for label, score in zip(trained.labels, expected, strict=True):
            assert got[label] == pytest.approx(float(score), abs=1e-5)
    assert not np.allclose(want.sum(axis=1), 1.0)  # independent, not a softmax


def test_a_multiclass_model_is_not_trained_further_as_multilabel(
    mobile_models: Trained, trainer_home: Path, tiny_shapes: Path
) -> None:
    """The same labels (the demo folder read as MULTILABEL), another classification type: the
    base model's softmax head would be trained as independent sigmoids."""
    base = mobile_models.models["mobile-low-latency-1"]
    done = run_trainer(
        *FAST, f"dataset.path={tiny_shapes}", "dataset.classification_type=MULTILABEL",
        f"base_model_id={base['name']}", "budget.train_budget_milli_node_hours=4",
        cwd=mobile_models.cwd, home=trainer_home,
    )  # fmt: skip
    line = refusal(done)  # the dataset is read first: the operation has begun
    assert "the dataset reads as MULTILABEL but the base model is MULTICLASS" in line
    assert line.endswith("set dataset.classification_type=MULTICLASS or train a new model")


def test_a_deployed_multilabel_model_answers_every_label_at_or_over_the_threshold() -> None:
    """The online model's scores are each label's sigmoid (the deployment itself, its server and
    clients, are the same as a MULTICLASS model's: tests/test_serving.py)."""
    import numpy as np
    import torch

    from trainer.tasks.image_classification.predict import classification_online

    logits = torch.tensor([[2.0, 1.0, -3.0], [-1.0, -2.0, 0.5]])
    online = classification_online(lambda pixels: logits, ["a", "b", "c"], None, multilabel=True)
    first, second = online.outputs(torch.zeros(2, 3, 4, 4))
    np.testing.assert_allclose(first, torch.sigmoid(logits[0]).numpy(), rtol=1e-6)
    said = online.annotations(first, online.params)  # AutoML's default threshold, 0.5
    assert [a["displayName"] for a in said] == ["a", "b"]  # two labels, best first
    assert online.annotations(second, online.params)[0]["displayName"] == "c"
    assert online.tf_serving(first)["labels"] == ["a", "b", "c"]
