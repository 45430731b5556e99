"""A SLURM job that is requeued resumes its operation (trainer/job/slurm.py), tested without a
cluster: the job's variables set by hand, ``scontrol`` a script that records its call."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, read_json, run_dirs, run_trainer
from tests.test_resume import checkpoint_step, wait_for

META = "imageClassificationModelMetadata"
JOB = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_CLUSTER_NAME": "test",
    "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost",
}  # fmt: skip


def fake_scontrol(folder: Path) -> Path:
    """A ``scontrol`` on PATH that writes its arguments to ``calls.txt``."""
    script = folder / "bin" / "scontrol"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {folder / "calls.txt"}\n')
    script.chmod(0o755)
    return script.parent


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_requeued_job_resumes_the_operation(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    budget = 8  # 28.8 s for both pieces
    command = [
        *FAST, f"dataset.path={tiny_shapes}", f"budget.train_budget_milli_node_hours={budget}",
        "budget.disable_early_stopping=true", "checkpoint.cost_flush_seconds=1",
    ]  # fmt: skip
    path = f"{fake_scontrol(tmp_path)}:{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(JOB, PATH=path, VISION_TRAINER_HOME=str(trainer_home), PYTHONPATH=str(REPO))
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", *command], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: any(tmp_path.glob("runs/*/*/state.json")))
        (run_dir,) = run_dirs(tmp_path)
        wait_for(lambda: read_json(run_dir / "state.json")["global_step"] >= 5)
        os.kill(process.pid, signal.SIGUSR1)  # sbatch --signal=USR1@SECONDS: the limit is near
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGUSR1, stderr[-3000:]
    assert (tmp_path / "calls.txt").read_text().split() == ["requeue", "4242"]
    state = read_json(run_dir / "state.json")
    assert state["status"] == "INTERRUPTED"
    stopped_at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert stopped_at == state["global_step"] > 0

    # SLURM runs the job's script again: the same command, job ID and a restart count.
    requeued = {**JOB, "SLURM_RESTART_COUNT": "1", "PATH": path}
    result = run_trainer(*command, cwd=tmp_path, home=trainer_home, env=requeued)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SLURM requeued this job" in result.stderr
    assert f"global step {stopped_at})" in result.stderr  # restored, not restarted
    assert run_dirs(tmp_path) == [run_dir]  # the same operation
    model = read_json(run_dir / "model.json")
    assert model["name"].rsplit("/", 1)[1] == state["model_id"]
    cost = int(model[META]["trainCostMilliNodeHours"])
    assert state["spent_seconds"] / 3.6 < cost <= budget  # both pieces, one budget

    # Requeued once more after it ended: nothing is trained again.
    again = {**requeued, "SLURM_RESTART_COUNT": "2"}
    result = run_trainer(*command, cwd=tmp_path, home=trainer_home, env=again)
    assert result.returncode == 0 and "ended SUCCEEDED" in result.stderr, result.stderr[-2000:]
    assert read_json(run_dir / "model.json") == model


def test_a_requeued_command_finds_only_its_own_operation(tmp_path: Path, monkeypatch) -> None:
    from trainer.job import slurm

    for name, value in JOB.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "state.json").write_text('{"status": "INTERRUPTED"}')
    key = slurm.job_key(["dataset.path=/a", "display_name=x"])
    assert key == slurm.job_key(["display_name=x", "dataset.path=/a"])  # the order aside
    slurm.bind(tmp_path, key, "projects/p/locations/l/operations/1", run_dir)
    assert slurm.requeued_operation(tmp_path, key) is None  # the job's first run
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    found = ("projects/p/locations/l/operations/1", "INTERRUPTED")
    assert slurm.requeued_operation(tmp_path, key) == found
    other = slurm.job_key(["dataset.path=/b", "display_name=x"])  # another training of the job
    assert slurm.requeued_operation(tmp_path, other) is None
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job
    assert slurm.requeued_operation(tmp_path, slurm.job_key(["dataset.path=/a"])) is None
    monkeypatch.delenv("SLURM_JOB_ID")
    assert slurm.job_key(["dataset.path=/a"]) is None  # not under SLURM
