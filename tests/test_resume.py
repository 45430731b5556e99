"""Training further from a base model, and resuming operations interrupted by signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, LOCAL, REPO, read_json, run_dir_of, run_dirs, run_trainer

META = "imageClassificationModelMetadata"


def start_trainer(*args: str, cwd: Path, home: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(VISION_TRAINER_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def checkpoint_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def mlflow_client(cwd: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    return mlflow.MlflowClient()


LONG_RUN = [
    *FAST,
    "budget.train_budget_milli_node_hours=15",
    "budget.disable_early_stopping=true",
    "checkpoint.every_minutes=0.02",  # a checkpoint every 1.2 s of training, mid-epoch too
    "checkpoint.cost_flush_seconds=1",
]


def interrupted_run(
    sig: int, cwd: Path, home: Path, data: Path, *extra: str
) -> tuple[Path, str]:  # fmt: skip
    process = start_trainer(*LONG_RUN, f"dataset.path={data}", *extra, cwd=cwd, home=home)
    try:
        wait_for(lambda: any(cwd.glob("runs/*/*/checkpoints/last.ckpt")))
        (run_dir,) = run_dirs(cwd)
        # Let it train on a little past its first checkpoints, then interrupt mid-epoch.
        wait_for(lambda: read_json(run_dir / "state.json")["global_step"] >= 20)
        os.kill(process.pid, sig)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode != 0, stderr[-3000:]
    return run_dir, stderr


def resume(run_dir: Path, cwd: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    operation = read_json(run_dir / "operation.json")["name"].rsplit("/", 1)[1]
    return run_trainer(f"resume_operation={operation}", *extra, cwd=cwd, home=home)


def test_sigkill_then_resume_continues_the_operation(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    run_dir, _ = interrupted_run(signal.SIGKILL, tmp_path, trainer_home, tiny_shapes)
    state = read_json(run_dir / "state.json")
    assert state["status"] == "RUNNING"  # nobody had the chance to say otherwise
    # The cost on record is at most cost_flush_seconds (1 s) plus a step behind.
    updated = datetime.fromisoformat(state["updated"].replace("Z", "+00:00"))
    assert datetime.now(timezone.utc) - updated < timedelta(seconds=30)
    assert state["spent_seconds"] > 0
    saved_step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert saved_step > 0
    # A state file edited to give the spent budget back: the store's record still counts.
    edited = {**state, "spent_seconds": 0.0}
    (run_dir / "state.json").write_text(json.dumps(edited))

    # Early stopping may be switched back on when resuming; it ends the test sooner.
    result = resume(run_dir, tmp_path, trainer_home, "budget.disable_early_stopping=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"global step {saved_step})" in result.stderr  # restored, not restarted from 0
    model = read_json(run_dir / "model.json")
    assert model["name"] == f"{LOCAL}/models/{state['model_id']}"  # the same model ID
    meta = model[META]
    spent_before = state["spent_seconds"] / 3.6
    assert spent_before < int(meta["trainCostMilliNodeHours"]) <= 15  # the pieces add up
    assert read_json(run_dir / "metrics.json")["global_step"] > saved_step
    client = mlflow_client(tmp_path)
    registered = client.get_registered_model(state["model_id"])
    assert registered.tags["trainCostMilliNodeHours"] == meta["trainCostMilliNodeHours"]


def test_sigterm_interrupts_and_a_resume_continues_past_a_damaged_checkpoint(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    run_dir, stderr = interrupted_run(signal.SIGTERM, tmp_path, trainer_home, tiny_shapes)
    assert "Traceback" not in stderr
    assert "resume_operation=" in stderr.splitlines()[-1]
    operation = read_json(run_dir / "operation.json")
    assert operation["done"] is True
    assert operation["error"]["code"] == 10
    assert "interrupted by SIGTERM" in operation["error"]["message"]
    state = read_json(run_dir / "state.json")
    assert state["status"] == "INTERRUPTED"
    # The checkpoint was written at the step boundary after the signal: at most one step old.
    interrupted_at = int(operation["error"]["message"].split("global step ")[1].split(";")[0])
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == interrupted_at
    assert state["global_step"] == interrupted_at > 0
    client = mlflow_client(tmp_path)
    run = client.get_run(state["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["state"] == "INTERRUPTED"

    # Resuming with a changed learning rate applies it; a changed model type is refused.
    refused = resume(run_dir, tmp_path, trainer_home, "model_type=mobile-versatile-1")
    assert refused.returncode == 2 and "model_type may not change" in refused.stderr
    # A damaged last checkpoint (a disk's fault, not a crash's: writes are atomic): the resume
    # falls back to the one before it.
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    previous_step = checkpoint_step(run_dir / "checkpoints" / "last.prev.ckpt")
    result = resume(
        run_dir, tmp_path, trainer_home, "optimizer.lr=0.001", "budget.disable_early_stopping=false"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "optimizer.lr changed from 0.002 to 0.001" in result.stderr
    assert "does not load" in result.stderr
    assert f"global step {previous_step})" in result.stderr
    assert read_json(run_dir / "operation.json")["done"] is True
    assert "response" in read_json(run_dir / "operation.json")


# -- training further -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(mobile_models):
    """The session's mobile-low-latency-1 model, trained until its budget was spent. Only this
    module trains further from it; the tests that change its tags or files put them back."""
    model_type = "mobile-low-latency-1"
    return mobile_models.cwd, mobile_models.run_dirs[model_type], mobile_models.models[model_type]


def val_history(cwd: Path, run_id: str, metric: str = "val_accuracy") -> list[tuple[int, float]]:
    history = mlflow_client(cwd).get_metric_history(run_id, metric)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]


def test_training_further_continues_from_the_base_model(
    base_model, trainer_home: Path, tiny_shapes: Path
) -> None:
    cwd, base_dir, base = base_model
    assert base[META]["stopReason"] == "BUDGET_REACHED"
    result = run_trainer(
        *FAST,
        f"dataset.path={tiny_shapes}",
        f"base_model_id={base['name']}",  # the full name is accepted
        "budget.train_budget_milli_node_hours=4",
        "budget.disable_early_stopping=true",
        "display_name=further",
        cwd=cwd,
        home=trainer_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    model = json.loads(result.stdout)
    assert model["name"] != base["name"]
    assert model[META]["baseModelId"] == base["name"].rsplit("/", 1)[1]
    assert int(model[META]["trainCostMilliNodeHours"]) <= 4  # its own cost, not the base's

    further_dir = run_dir_of(cwd, model)
    further_run = read_json(further_dir / "state.json")["run_id"]
    further_curve = val_history(cwd, further_run)
    # Steps go on from the base's final (best) checkpoint, and the first validation is about
    # where the base ended, far from the base's own first (from-scratch) validation. The
    # validation split has 10 images, so the loss is the steadier witness.
    base_step = checkpoint_step(base_dir / "checkpoints" / "best.ckpt")
    assert f"global step {base_step})" in result.stderr
    assert further_curve[0][0] > base_step > 0
    # The weights it started from are the base's, exactly: its start.ckpt is the base's best
    # checkpoint without the callbacks' state. (The first validation losses were compared once:
    # on 10 images, after a pass at a rate warming up, they were noise, 1.84 against 1.79.)
    import torch

    start = torch.load(further_dir / "start.ckpt", weights_only=True)
    # Its convergence, best-model tracking and rate schedule start afresh (the base's had a
    # state: an annealing before convergence would have held the new model's rate at its floor).
    assert start["callbacks"] == {}
    assert "BudgetDecay" in torch.load(base_dir / "checkpoints" / "best.ckpt")["callbacks"]
    started = start["state_dict"]
    based = torch.load(base_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert started.keys() == based.keys()
    assert all(torch.equal(started[key], based[key]) for key in based)


def refusal(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    return line


def further(base_model, home: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cwd, _, base = base_model
    return run_trainer(
        *FAST, f"dataset.path={data}", f"base_model_id={base['name'].rsplit('/', 1)[1]}", *extra,
        cwd=cwd, home=home,
    )  # fmt: skip


def test_refuses_an_unknown_base_model(base_model, trainer_home: Path, tiny_shapes: Path) -> None:
    cwd = base_model[0]
    result = run_trainer(*FAST, "base_model_id=ICN123", cwd=cwd, home=trainer_home)
    assert "base_model_id='ICN123' is not a model" in refusal(result)


def test_refuses_a_base_model_older_than_14_days(
    base_model, trainer_home: Path, tiny_shapes: Path
) -> None:
    cwd, _, base = base_model
    model_id = base["name"].rsplit("/", 1)[1]
    client = mlflow_client(cwd)
    real = client.get_registered_model(model_id).tags["create_time"]
    old = (datetime.now(timezone.utc) - timedelta(days=15)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client.set_registered_model_tag(model_id, "create_time", old)
    try:
        line = refusal(further(base_model, trainer_home, tiny_shapes))
        assert "created 15.0 days ago" in line and "resume.max_base_model_age_days=14" in line
    finally:
        client.set_registered_model_tag(model_id, "create_time", real)


def test_refuses_other_labels_naming_added_and_missing(
    base_model, trainer_home: Path, tiny_shapes: Path, tmp_path: Path
) -> None:
    import shutil

    data = tmp_path / "relabelled"
    shutil.copytree(tiny_shapes, data)
    (data / "circle").rename(data / "ellipse")
    line = refusal(further(base_model, trainer_home, data))
    assert "added ellipse" in line and "missing circle" in line


def test_refuses_another_model_type_or_task(
    base_model, trainer_home: Path, tiny_shapes: Path
) -> None:
    line = refusal(further(base_model, trainer_home, tiny_shapes, "model_type=mobile-versatile-1"))
    assert "model_type=mobile-low-latency-1, not mobile-versatile-1" in line
    cwd, _, base = base_model
    model_id = base["name"].rsplit("/", 1)[1]
    client = mlflow_client(cwd)
    client.set_registered_model_tag(model_id, "task", "object_detection")
    try:
        line = refusal(further(base_model, trainer_home, tiny_shapes))
        assert "is a object_detection model, not image_classification" in line
    finally:
        client.set_registered_model_tag(model_id, "task", "image_classification")
    # A stored model type becomes a Hydra override only if the task offers it.
    client.set_registered_model_tag(model_id, "modelType", "../../../tmp/x")
    try:
        line = refusal(further(base_model, trainer_home, tiny_shapes))
        assert "which task image_classification does not offer" in line
    finally:
        client.set_registered_model_tag(model_id, "modelType", "mobile-low-latency-1")


def test_refuses_a_missing_or_unreadable_checkpoint(
    base_model, trainer_home: Path, tiny_shapes: Path
) -> None:
    """A damaged local checkpoint falls back to the store's copy (tested through the digest in
    test_hostile_inputs.py); damaged in both places, training further is refused."""
    cwd, base_dir, base = base_model
    best = base_dir / "checkpoints" / "best.ckpt"
    artifacts = list((cwd / "mlartifacts").rglob("best.ckpt"))
    assert artifacts  # the checkpoint travels with the model in MLflow
    saved = {path: path.read_bytes() for path in [best, *artifacts]}
    try:
        for path in saved:
            path.write_bytes(b"not a checkpoint")
        (base_dir / "checkpoints" / "best.prev.ckpt").unlink(missing_ok=True)
        assert "missing or unreadable" in refusal(further(base_model, trainer_home, tiny_shapes))
    finally:
        for path, content in saved.items():
            path.write_bytes(content)


def test_ctrl_c_twice_exits_at_once_leaving_a_good_checkpoint(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    process = start_trainer(
        *LONG_RUN, f"dataset.path={tiny_shapes}", cwd=tmp_path, home=trainer_home
    )
    try:
        wait_for(lambda: any(tmp_path.glob("runs/*/*/checkpoints/last.ckpt")))
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)  # two signals sent at once would merge into one pending signal
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, stderr = process.communicate(timeout=30)
        assert time.monotonic() - sent < 5
    finally:
        process.kill()
    # 130 from our handler; or killed by the signal itself when it lands during interpreter
    # shutdown, after Python has reset its handlers: both end the process at once.
    assert process.returncode in (128 + signal.SIGINT, -signal.SIGINT), stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") > 0


def test_second_signal_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministically, in-process: the first SIGINT asks for a stop, the second exits."""
    from trainer.job.checkpoints import StopRequest

    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # let the interpreter run the handler
        assert stop.reason == "SIGINT" and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert exits == [128 + signal.SIGINT]
    finally:
        stop.restore()
