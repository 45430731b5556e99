"""Multi-label image classification (AutoML's MULTILABEL datasets and models): the session's
short training on generated shapes, one to three an image, on two processes (conftest.py), what
it records, and training it further; resuming one (slow); the monitors a MULTILABEL model is
judged by, in a training and a sweep; what the defaults learn, and int8 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST, Trained, checked, read_json, run_dir_of, run_trainer, train
from tests.test_automl_conformance import automl, parse_operation, strict
from tests.test_resume import refusal
from trainer.errors import UserError
from trainer.settings import MULTICLASS, MULTILABEL, Settings


def test_a_multilabel_dataset_trains_scoring_each_label_on_its_own(
    multilabel_model: Trained, multilabel_csv: Path
) -> None:
    from trainer.data.manifest import TEST, read_dataset

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
    assert config["trainer"]["devices"] == 2 and config["trainer"]["strategy"] == "ddp"
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
    tested = read_dataset(multilabel_csv).split(TEST)
    assert overall["evaluatedExampleCount"] == len(tested) > 0  # rank 0 alone, each image once
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


def test_a_multilabel_model_trains_further_as_multilabel(
    multilabel_model: Trained, trainer_home: Path, multilabel_csv: Path
) -> None:
    """From the base's best checkpoint, on one process, its type and monitors kept."""
    from tests.test_resume import checkpoint_step

    cwd, base_run, base, _ = multilabel_model.only()
    done = run_trainer(
        *FAST, f"dataset.path={multilabel_csv}", f"base_model_id={base['name']}",
        "budget.train_budget_milli_node_hours=4", "budget.disable_early_stopping=true",
        "task.convergence_monitor=val_loss", "task.convergence_monitor_mode=min",
        cwd=cwd, home=trainer_home,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    base_step = checkpoint_step(base_run / "checkpoints" / "best.ckpt")
    assert f"global step {base_step})" in done.stderr  # from the base, not from scratch
    model = json.loads(done.stdout)
    run_dir = run_dir_of(cwd, model)
    assert model["imageClassificationModelMetadata"]["baseModelId"] == base["name"].rsplit("/")[-1]
    config = read_json(run_dir / "state.json")["config"]
    assert config["dataset"]["classification_type"] == "MULTILABEL"
    assert config["task"]["monitor"] == "val_auprc"
    assert "test_auprc" in read_json(run_dir / "metrics.json")


@pytest.mark.slow
def test_an_interrupted_multilabel_training_resumes_as_multilabel(
    tmp_path: Path, trainer_home: Path, multilabel_csv: Path
) -> None:
    import signal

    from tests.test_resume import checkpoint_step, interrupted_run, resume

    run_dir, _ = interrupted_run(
        signal.SIGTERM, tmp_path, trainer_home, multilabel_csv,
        "task.convergence_monitor=val_loss", "task.convergence_monitor_mode=min",
    )  # fmt: skip
    assert read_json(run_dir / "state.json")["status"] == "INTERRUPTED"
    interrupted_at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    # The settled type and monitors are the operation's: the resume reads them as they were.
    done = resume(run_dir, tmp_path, trainer_home)
    assert done.returncode == 0, done.stderr[-3000:]
    state = read_json(run_dir / "state.json")
    assert state["status"] == "SUCCEEDED"
    assert state["config"]["dataset"]["classification_type"] == "MULTILABEL"
    assert state["config"]["task"]["monitor"] == "val_auprc"
    assert {"test_auprc", "best_val_auprc"} <= set(read_json(run_dir / "metrics.json"))
    assert f"global step {interrupted_at})" in done.stderr  # its own last checkpoint


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


# -- the monitors ------------------------------------------------------------------------------


def settings_of(tmp_path: Path, *overrides: str) -> Settings:
    return checked(tmp_path / "home", f"sqlite:///{tmp_path}/m.db", *overrides)


def test_val_accuracy_cannot_judge_a_multilabel_models_convergence(tmp_path: Path) -> None:
    """A MULTILABEL model logs val_loss, val_auprc and val_exact_match: the MULTICLASS metric
    as the convergence monitor is refused in one line before the training, not by Lightning
    after its first validation."""
    from trainer.job.settings import as_classification_type

    accuracy = settings_of(tmp_path, "task.convergence_monitor=val_accuracy")
    with pytest.raises(UserError) as refused:
        as_classification_type(accuracy, MULTILABEL)
    assert str(refused.value) == (
        "task.convergence_monitor=val_accuracy: a MULTILABEL model does not log it (it scores "
        "each label on its own); judge convergence on val_loss (the default) or val_auprc"
    )
    assert as_classification_type(accuracy, MULTICLASS).task.monitor == "val_accuracy"
    # Its own metric may judge it; settled settings (a resume's) settle again unchanged.
    auprc = settings_of(tmp_path, "task.convergence_monitor=val_auprc",
                        "task.convergence_monitor_mode=max")  # fmt: skip
    settled = as_classification_type(auprc, MULTILABEL)
    assert (settled.task.monitor, settled.task.monitor_mode) == ("val_auprc", "max")
    assert as_classification_type(settled, MULTILABEL) == settled


def test_a_sweep_judges_multilabel_trials_by_the_metric_they_are_kept_by(
    tmp_path: Path, multilabel_csv: Path, tiny_shapes: Path
) -> None:
    """A sweep's trials report ``best_<monitor>``: on a MULTILABEL dataset, val_auprc."""
    from hydra import compose, initialize_config_dir

    from trainer import CONF_DIR
    from trainer.sweep.runner import trials_monitor

    def monitor(*overrides: str) -> tuple[str, bool]:
        """As the sweeper gets it: Hydra's own keys too, some of which no sweep resolves."""
        where = [f"home={tmp_path / 'home'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            config = compose("config", [*where, *overrides], return_hydra_config=True)
        return trials_monitor(config)

    assert monitor(f"dataset.path={multilabel_csv}") == ("val_auprc", True)
    assert monitor(f"dataset.path={tiny_shapes}") == ("val_accuracy", True)
    assert monitor() == ("val_accuracy", True)  # the bundled demo: a folder
    forced = monitor(f"dataset.path={tiny_shapes}", "dataset.classification_type=MULTILABEL")
    assert forced == ("val_auprc", True)
    assert monitor("task=object_detection") == ("val_map", True)


# -- what the defaults learn -------------------------------------------------------------------


@pytest.mark.slow
def test_the_defaults_learn_a_multilabel_dataset_and_int8_keeps_its_label_sets(
    tmp_path: Path, trainer_home: Path, monkeypatch
) -> None:
    """Issue 33's acceptance: 400 generated 64 px images of one to three shapes, every default
    (no weights in the tests' hub cache: from scratch) and 20 milli-node-hours (72 s). Its int8
    TF Lite package, run by LiteRT alone, gives the float model's label sets."""
    import numpy as np

    from tests.test_export import stored
    from tests.test_tflite import check_tflite_package, export, litert_alone, pytorch_logits
    from trainer.data.images import uint8_pixels
    from trainer.data.manifest import TEST
    from trainer.tasks.image_classification.demo import write_multilabel_shapes

    csv = write_multilabel_shapes(tmp_path / "data", 400, 64, seed=3)
    model, run_dir = train(
        tmp_path, trainer_home, f"dataset.path={csv}", "budget.min_milli_node_hours=1",
        "budget.train_budget_milli_node_hours=20",
    )  # fmt: skip
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["test_auprc"] >= 0.9
    assert metrics["test_exact_match"] > 0.5  # the exact label set on most TEST images
    assert int(model["imageClassificationModelMetadata"]["trainCostMilliNodeHours"]) <= 20

    package = export(tmp_path, model, "--quantize", "int8")
    verification = check_tflite_package(package, model, "QUANTIZED_INT8")["verification"]
    assert verification["labelSetAgreementWithFloat"] >= 0.95
    assert verification["floatTestExactMatch"] - verification["int8TestExactMatch"] <= 0.02
    (output,) = read_json(package / "tflite_metadata.json")["outputTensors"]
    scale, zero_point = output["quantization"]["scale"], output["quantization"]["zeroPoint"]
    trained = stored(Trained(tmp_path, {"m": model}, {"m": run_dir}), model, monkeypatch)
    items = trained.manifest().split(TEST)
    assert verification["testImages"] == len(items) > 0
    inputs = [uint8_pixels(item.path, trained.settings.model.size) for item in items]
    got = [(have - zero_point) * scale for (have,) in litert_alone(package, inputs, tmp_path)]
    # A label set: the labels scored 0.5 and over, a logit of 0 and more.
    int8_sets = [set(np.flatnonzero(logits.ravel() >= 0)) for logits in got]
    float_sets = [set(np.flatnonzero(w.ravel() >= 0)) for w in pytorch_logits(trained, inputs)]
    agree = np.mean([a == b for a, b in zip(int8_sets, float_sets, strict=True)])
    assert agree == pytest.approx(verification["labelSetAgreementWithFloat"])
