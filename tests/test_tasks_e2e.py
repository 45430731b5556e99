"""Object detection and video classification through the same job, CLI and store as images.

The short runs here check the mechanism (budget, stop reason, IDs, evaluation, prediction,
resume); the runs marked slow check that the models learn (run by `make test-all`).
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest

from tests.conftest import DETECTION, LOCAL, VIDEO, read_json, run_dirs, run_trainer, train
from tests.test_automl_conformance import check_batch_prediction_parses
from tests.test_manage import cli
from tests.test_resume import checkpoint_step, start_trainer, wait_for
from trainer.data.manifest import TEST
from trainer.tasks.video_classification.data import read_video_dataset

DETECTION_META = "imageObjectDetectionModelMetadata"


def check_model(run_dir: Path, prefix: str, budget: int) -> None:
    """The model's name and figures (model_details.json holds all of them, for every task)."""
    model = read_json(run_dir / "model.json")
    assert model["name"].startswith(f"{LOCAL}/models/{prefix}")
    meta = read_json(run_dir / "model_details.json")
    assert meta["stopReason"] in ("MODEL_CONVERGED", "BUDGET_REACHED")
    assert 0 < int(meta["trainCostMilliNodeHours"]) <= budget
    assert meta["nodeQps"] > 0


# -- object detection ----------------------------------------------------------------------


def test_detection_trains_evaluates_and_is_listed(detection_model) -> None:
    cwd, run_dir, model, budget = detection_model.only()
    check_model(run_dir, "IOD", budget)
    assert "test_map_50" in read_json(run_dir / "metrics.json")
    (evaluation_file,) = run_dir.glob("evaluations/*/evaluation.json")
    overall = read_json(evaluation_file)[0]["imageObjectDetectionEvaluationMetrics"]
    assert overall["evaluatedBoundingBoxCount"] > 0
    assert (evaluation_file.parent / "test_boxes.png").is_file()
    listing = cli("models", "list", "--filter", "task=object_detection", cwd=cwd)
    assert model["name"].rsplit("/", 1)[1] in listing.stdout
    evaluations = cli("models", "evaluations", model["name"], cwd=cwd)
    assert "mAP@0.5" in evaluations.stdout


def test_mlflow_loads_the_logged_detector_without_unpickling(detection_model, monkeypatch) -> None:
    """A detector is TorchScript (torch.export cannot follow its NMS), logged as a pyfunc from
    code that runs torch.jit.load: MLflow loads it with pickle refused, and `mlflow models
    serve`'s pyfunc finds boxes with it."""
    import mlflow
    import numpy as np

    cwd, _, model, _ = detection_model.only()
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model(f"models:/{model['name'].rsplit('/', 1)[1]}/1")
    images = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    found = np.asarray(served.predict(images))
    assert found.shape == (1, 100, 6)  # a row per box: its corners, score and label (or -1)


def test_detection_batch_prediction(detection_model, detection_csv: Path) -> None:
    cwd, _, model, _ = detection_model.only()
    images = sorted((detection_csv.parent / "images").glob("*.png"))[:3]
    (cwd / "boxes.csv").write_text("\n".join(str(p) for p in images) + "\nmissing.png\n")
    result = cli(
        "predict", model["name"], "--input", "boxes.csv", "--output", "out",
        "--score-threshold", "0", "--max-bounding-box-count", "2", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip())
    lines = (folder / "image_object_detection_1.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["ID"] for r in records] == [str(p) for p in images]
    for record in records:
        assert len(record["annotations"]) <= 2
        for annotation in record["annotations"]:
            (low, high) = annotation["imageObjectDetection"]["boundingBox"]["normalizedVertices"]
            assert 0 <= low["x"] <= high["x"] <= 1 and 0 <= low["y"] <= high["y"] <= 1
    errors = [json.loads(line) for line in (folder / "errors_1.jsonl").read_text().splitlines()]
    assert errors[0]["ID"] == "missing.png" and errors[0]["errors"]["code"] == 5
    metadata, result_metadata = check_batch_prediction_parses(
        "object_detection", cwd, result, cwd / "boxes.csv"
    )
    assert [f.code for f in metadata.partial_failures] == [5]
    assert result_metadata == {"max_bounding_box_count": "2"}


@pytest.mark.slow  # the task-agnostic job's mechanism: test_resume.py covers it
def test_detection_resumes_after_sigterm(tmp_path: Path, trainer_home: Path, detection_csv):
    args = [
        *DETECTION, f"dataset.path={detection_csv}", "budget.train_budget_milli_node_hours=20",
        "budget.disable_early_stopping=true", "checkpoint.every_minutes=0.02",
        "checkpoint.cost_flush_seconds=1",
    ]  # fmt: skip
    process = start_trainer(*args, cwd=tmp_path, home=trainer_home)
    try:
        wait_for(lambda: any(tmp_path.glob("runs/*/*/checkpoints/last.ckpt")), timeout=300)
        (run_dir,) = run_dirs(tmp_path)
        wait_for(lambda: read_json(run_dir / "state.json")["global_step"] >= 3, timeout=300)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    saved = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    operation = read_json(run_dir / "operation.json")["name"].rsplit("/", 1)[1]
    assert operation.startswith("IOD")
    # Early stopping may be switched back on when resuming; it ends the test sooner.
    resumed = run_trainer(
        f"resume_operation={operation}", "budget.disable_early_stopping=false",
        cwd=tmp_path, home=trainer_home, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"global step {saved})" in resumed.stderr  # restored, not restarted
    meta = read_json(run_dir / "model.json")[DETECTION_META]
    assert int(meta["trainCostMilliNodeHours"]) <= 20  # both pieces within the one budget


# -- video classification -------------------------------------------------------------------


def test_video_learns_far_above_chance(video_model, video_csv: Path) -> None:
    cwd, run_dir, model, budget = video_model.only()
    check_model(run_dir, "VCN", budget)
    accuracy = read_json(run_dir / "metrics.json")["test_accuracy"]
    assert accuracy >= 0.7  # four directions: chance is 0.25
    (evaluation_file,) = run_dir.glob("evaluations/*/evaluation.json")
    evaluation = read_json(evaluation_file)
    assert evaluation[0]["classificationEvaluationMetrics"]["confusionMatrix"]["displayName"] == [
        "down", "left", "right", "up",
    ]  # fmt: skip
    test_segments = read_video_dataset(video_csv).split(TEST)
    assert evaluation[0]["evaluatedExampleCount"] == len(test_segments) > 0


def test_video_batch_prediction_of_each_kind(video_model, video_csv: Path) -> None:
    cwd, _, model, _ = video_model.only()
    video = sorted((video_csv.parent / "videos").glob("*.mp4"))[0]
    (cwd / "clips.csv").write_text(f"{video},0,inf\n{video},0.5,1.5\nmissing.mp4,0,1\n")
    result = cli(
        "predict", model["name"], "--input", "clips.csv", "--output", "out",
        "--score-threshold", "0", "--shot-classification", "--1s-interval-classification",
        cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip())
    rows = list(csv.reader((folder / "video_classification.csv").open()))
    assert [row[:3] for row in rows] == [
        [str(video), "0", "inf"], [str(video), "0.5", "1.5"], ["missing.mp4", "0", "1"],
    ]  # fmt: skip
    assert rows[0][4] == "OK" and rows[2][4].startswith("NOT_FOUND")
    metadata, _ = check_batch_prediction_parses(
        "video_classification", cwd, result, cwd / "clips.csv"
    )
    (failure,) = metadata.partial_failures
    assert failure.code == 5 and failure.message.startswith("missing.mp4: ")
    annotations = json.loads((folder / rows[0][3]).read_text())
    kinds = {a["videoClassification"]["type"] for a in annotations}
    assert kinds == {"segment", "shot", "1s_interval"}
    one_second = [a for a in annotations if a["videoClassification"]["type"] == "1s_interval"]
    starts = {a["videoClassification"]["timeSegment"]["startTimeOffset"] for a in one_second}
    assert starts == {"0s", "1s", "2s"}  # a demo video lasts 3 s


@pytest.mark.slow  # the task-agnostic job's mechanism: test_manage.py covers it
def test_video_training_is_cancelled_like_any_other(
    tmp_path: Path, trainer_home: Path, video_csv: Path
) -> None:
    process = start_trainer(
        *VIDEO, "budget.train_budget_milli_node_hours=40", "budget.disable_early_stopping=true",
        "checkpoint.cancel_poll_seconds=0.5", cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    try:
        wait_for(lambda: any(tmp_path.glob("runs/*/*/checkpoints/last.ckpt")), timeout=300)
        (run_dir,) = run_dirs(tmp_path)
        name = read_json(run_dir / "operation.json")["name"]
        assert cli("operations", "cancel", name, cwd=tmp_path).returncode == 0
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "cancelled at global step" in stderr
    operation = read_json(run_dir / "operation.json")
    assert name.startswith(f"{LOCAL}/operations/VCN") and operation["error"]["code"] == 1


# -- learning, at the sizes the tasks are meant for (slow) -----------------------------------


def untrained_map_50(run_dir: Path, cwd: Path) -> float:
    """mAP@0.5 on the same TEST images of a detector as the job builds it, before training."""
    import torch

    from evaluation.detection import mean_average_precision
    from trainer.data.manifest import TEST
    from trainer.settings import Settings
    from trainer.tasks.object_detection.task import ObjectDetection

    torch.manual_seed(0)
    cfg = Settings.parse(read_json(run_dir / "state.json")["config"])
    task = ObjectDetection()
    manifest = task.read_manifest(cfg)
    network = task.network(cfg, manifest.labels, pretrained=None)
    evaluation = task.evaluate_items(
        network, cfg, manifest.split(TEST), manifest.labels, "models/untrained"
    )
    return mean_average_precision(evaluation.resources[0], 0.5)


def trained_map_50(run_dir: Path) -> float:
    from evaluation.detection import mean_average_precision

    (evaluation_file,) = run_dir.glob("evaluations/*/evaluation.json")
    return mean_average_precision(read_json(evaluation_file)[0], 0.5)


def learning_timeout(budget: int) -> float:
    """A learning run may spend its whole budget (3.6 s a milli-node-hour: 720 s for 200, past
    train()'s 600 s), plus its start-up before the meter runs; on a loaded machine it does, where
    a quiet one converges sooner. The timeout is for a hung training, not a slow one."""
    return budget * 3.6 + 180


# The learning runs' budgets: where they stop, not how far they must get. Trained until they
# converged (150 and 200), they ran 53 and 85+ milli-node-hours, 3.4 and 5.5 min of the
# suite; their validation mAP was already 0.68-0.76 and 0.58-0.72 by 25 and 36 (a CI run at
# 874863a beside other work), far over the thresholds below, which are on mAP@0.5.
SHAPES_BUDGET, PHOTOS_BUDGET = 30, 40


@pytest.mark.slow
def test_detection_learns_on_the_generated_shapes(tmp_path: Path, trainer_home: Path) -> None:
    _, run_dir = train(
        tmp_path, trainer_home, "task=object_detection", "model.input_size=[128,128]",
        "data.batch_size=8", "budget.min_milli_node_hours=1",
        f"budget.train_budget_milli_node_hours={SHAPES_BUDGET}", "early_stopping.patience=6",
        "early_stopping.min_patience_steps=0", timeout=learning_timeout(SHAPES_BUDGET),
    )  # fmt: skip
    check_model(run_dir, "IOD", SHAPES_BUDGET)
    trained, untrained = trained_map_50(run_dir), untrained_map_50(run_dir, tmp_path)
    print(f"generated shapes: mAP@0.5 {trained:.3f} trained, {untrained:.3f} untrained")
    assert trained > max(0.4, 5 * untrained)


@pytest.mark.slow
def test_detection_learns_on_real_photos(tmp_path: Path, trainer_home: Path) -> None:
    from benchmarks.real_detection_dataset import build_real_detection_dataset

    dataset = build_real_detection_dataset(tmp_path / "real", images=300, size=160)
    _, run_dir = train(
        tmp_path, trainer_home, "task=object_detection", f"dataset.path={dataset}",
        "model.input_size=[160,160]", "data.batch_size=8", "budget.min_milli_node_hours=1",
        f"budget.train_budget_milli_node_hours={PHOTOS_BUDGET}", "early_stopping.patience=6",
        "early_stopping.min_patience_steps=0", timeout=learning_timeout(PHOTOS_BUDGET),
    )  # fmt: skip
    check_model(run_dir, "IOD", PHOTOS_BUDGET)
    trained, untrained = trained_map_50(run_dir), untrained_map_50(run_dir, tmp_path)
    print(f"real photos: mAP@0.5 {trained:.3f} trained, {untrained:.3f} untrained")
    assert trained > max(0.3, 5 * untrained)
