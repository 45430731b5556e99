"""Several processes, one training: real DDP over gloo on the CPU, started by Lightning's own
launcher from `python -m trainer` (trainer/job/distributed.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.conftest import FAST, read_json, run_dirs, run_trainer
from tests.test_resume import checkpoint_step, resume, start_trainer, wait_for
from trainer.data.manifest import TEST, read_dataset

META = "imageClassificationModelMetadata"
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def test_two_processes_train_one_model_under_one_budget(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    import mlflow

    budget = 9  # 32 s: the second process starts (6 s of imports) inside the billed fit
    result = run_trainer(
        *FAST, *DDP, f"dataset.path={tiny_shapes}", "display_name=ddp",
        f"budget.train_budget_milli_node_hours={budget}", "budget.disable_early_stopping=true",
        cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 follows the operation" in result.stderr
    (run_dir,) = run_dirs(tmp_path)  # one operation, in one run directory
    model = read_json(run_dir / "model.json")
    meta = model[META]
    assert meta["stopReason"] == "BUDGET_REACHED"
    assert 1 <= int(meta["trainCostMilliNodeHours"]) <= budget  # one node: devices are free
    assert meta["nodeCount"] == "1"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    assert len(client.search_runs(experiments)) == 1  # one MLflow run
    (registered,) = client.search_registered_models()  # one model
    assert registered.name == model["name"].rsplit("/", 1)[1]

    # The TEST pass ran on rank 0 alone: every TEST image once, none padded in by a sampler.
    (evaluation_file,) = run_dir.glob("evaluations/*/evaluation.json")
    tested = read_json(evaluation_file)[0]["evaluatedExampleCount"]
    assert tested == len(read_dataset(tiny_shapes).split(TEST)) > 0
    # The learning rate followed the budget on both ranks alike: the last checkpoint's rate is
    # the configured one scaled by the agreed factor.
    import torch

    (group,) = torch.load(run_dir / "checkpoints" / "last.ckpt")["optimizer_states"][0][
        "param_groups"
    ]
    assert group["lr"] == pytest.approx(2e-3 * group["budget_lr_factor"])
    assert group["budget_lr_factor"] < 0.9


def test_ranks_are_read_from_each_launchers_variables(monkeypatch) -> None:
    from trainer.errors import UserError
    from trainer.job.distributed import BRIEF_ENV, brief_to_follow, is_rank_zero

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    for name in (*names, BRIEF_ENV):
        monkeypatch.delenv(name, raising=False)
    assert is_rank_zero() and brief_to_follow() is None  # one process
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher's child: follows its brief
    monkeypatch.setenv(BRIEF_ENV, "/runs/x/distributed_brief.json")
    assert not is_rank_zero() and brief_to_follow() == Path("/runs/x/distributed_brief.json")
    monkeypatch.delenv(BRIEF_ENV)
    monkeypatch.setenv("RANK", "3")  # torchrun started it: no brief to follow yet
    with pytest.raises(UserError, match="torchrun and SLURM are not supported yet"):
        brief_to_follow()
    monkeypatch.setenv("RANK", "0")
    assert is_rank_zero() and brief_to_follow() is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's rank 0 must not wait for the others
    with pytest.raises(UserError, match="torchrun and SLURM are not supported yet"):
        brief_to_follow()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def underway(process, cwd: Path) -> tuple[Path, int]:
    """Once a started two-process training has trained 10 steps: its run directory and the
    process ID of rank 1, a child of rank 0."""
    wait_for(lambda: any(cwd.glob("runs/*/*/distributed_brief.json")))
    (run_dir,) = run_dirs(cwd)
    wait_for(lambda: read_json(run_dir / "state.json")["global_step"] >= 10)
    (follower,) = [pid for pid in children(process.pid) if b"trainer" in
                   Path(f"/proc/{pid}/cmdline").read_bytes()]  # fmt: skip
    return run_dir, follower


@pytest.mark.slow
def test_sigterm_to_the_other_rank_stops_both_and_a_resume_goes_on(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    budget = 25
    process = start_trainer(
        *FAST, *DDP, f"dataset.path={tiny_shapes}", "budget.disable_early_stopping=true",
        f"budget.train_budget_milli_node_hours={budget}", "checkpoint.cost_flush_seconds=1",
        cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    try:
        run_dir, follower = underway(process, tmp_path)
        os.kill(follower, signal.SIGTERM)  # rank 1 only: its vote stops rank 0 too
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    operation = read_json(run_dir / "operation.json")
    assert (
        operation["error"]["code"] == 10
        and "interrupted by SIGTERM" in operation["error"]["message"]
    )
    stopped_at = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert read_json(run_dir / "state.json")["status"] == "INTERRUPTED" and stopped_at > 0

    # The operation's config keeps the two processes: the resume trains on both, on its budget.
    result = resume(run_dir, tmp_path, trainer_home, "budget.disable_early_stopping=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 follows the operation" in result.stderr
    assert f"global step {stopped_at})" in result.stderr  # restored, not restarted
    assert run_dirs(tmp_path) == [run_dir]
    cost = int(read_json(run_dir / "model.json")[META]["trainCostMilliNodeHours"])
    assert cost <= budget
    assert read_json(run_dir / "metrics.json")["global_step"] > stopped_at


def running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent to read its status does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_cancel_stops_both_ranks_and_leaves_no_process(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    from tests.test_manage import cli, cli_json

    process = start_trainer(
        *FAST, *DDP, f"dataset.path={tiny_shapes}", "budget.disable_early_stopping=true",
        "budget.train_budget_milli_node_hours=40", "checkpoint.cost_flush_seconds=1",
        "checkpoint.cancel_poll_seconds=0.5", cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    try:
        run_dir, follower = underway(process, tmp_path)
        (operation,) = cli_json("operations", "list", cwd=tmp_path)["operations"]
        assert cli("operations", "cancel", operation["name"], cwd=tmp_path).returncode == 0
        _, stderr = process.communicate(timeout=90)
    finally:
        process.kill()
    assert process.returncode == 1, stderr[-3000:]
    assert "cancelled at global step" in stderr
    wait_for(lambda: not running(follower), timeout=30)
    assert read_json(run_dir / "state.json")["status"] == "CANCELLED"
    assert run_dirs(tmp_path) == [run_dir]


@pytest.mark.slow
def test_two_processes_converge_together(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    result = run_trainer(
        *FAST, *DDP, f"dataset.path={tiny_shapes}", "budget.train_budget_milli_node_hours=40",
        cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    model = read_json(run_dir / "model.json")
    assert model[META]["stopReason"] == "MODEL_CONVERGED"
    assert int(model[META]["trainCostMilliNodeHours"]) < 40
