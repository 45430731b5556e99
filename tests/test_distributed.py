"""Several processes, one training: real DDP over gloo on the CPU, started by Lightning's own
launcher from `python -m trainer` (trainer/job/distributed.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DDP, FAST, REPO, Trained, read_json, run_dir_of, run_dirs, run_trainer
from tests.test_resume import checkpoint_step, resume, start_trainer, wait_for
from trainer.data.manifest import TEST, read_dataset

META = "imageClassificationModelMetadata"


def test_two_processes_train_one_model_under_one_budget(
    multilabel_model: Trained, multilabel_csv: Path
) -> None:
    """The session's MULTILABEL model, trained on two processes (tests/test_multilabel.py's
    fixture; rank 1 said it followed the operation)."""
    import mlflow

    cwd, run_dir, model, budget = multilabel_model.only()
    meta = model[META]
    assert meta["stopReason"] == "BUDGET_REACHED"
    assert 1 <= int(meta["trainCostMilliNodeHours"]) <= budget  # one node: devices are free
    assert meta["nodeCount"] == "1"

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    model_id = model["name"].rsplit("/", 1)[1]
    runs = client.search_runs(experiments, f"tags.model_id = '{model_id}'")
    assert len(runs) == 1  # one MLflow run
    assert client.get_registered_model(model_id)  # one model

    # The TEST pass ran on rank 0 alone: every TEST image once, none padded in by a sampler.
    (evaluation_file,) = run_dir.glob("evaluations/*/evaluation.json")
    tested = read_json(evaluation_file)[0]["evaluatedExampleCount"]
    assert tested == len(read_dataset(multilabel_csv).split(TEST)) > 0
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
    from trainer.job.distributed import BRIEF_ENV, brief_to_follow, is_rank_zero, started_by_cluster

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID",
             "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME")  # fmt: skip
    for name in (*names, BRIEF_ENV):
        monkeypatch.delenv(name, raising=False)
    assert is_rank_zero() and brief_to_follow() is None and not started_by_cluster()
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher's child: follows its brief
    monkeypatch.setenv(BRIEF_ENV, "/runs/x/distributed_brief.json")
    assert not is_rank_zero() and brief_to_follow() == Path("/runs/x/distributed_brief.json")
    assert not started_by_cluster()
    monkeypatch.delenv(BRIEF_ENV)
    monkeypatch.setenv("RANK", "3")  # an unknown launcher started it: refused
    with pytest.raises(UserError, match="a launcher other than Lightning's, torchrun or srun"):
        brief_to_follow()
    monkeypatch.setenv("RANK", "0")
    assert is_rank_zero() and brief_to_follow() is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # its rank 0 must not wait for the others
    with pytest.raises(UserError, match="a launcher other than"):
        brief_to_follow()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun: every rank joins the group
    assert started_by_cluster() and brief_to_follow() is None
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "2")  # srun, one task per device
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert started_by_cluster() and brief_to_follow() is None
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive allocation: Lightning's launcher
    assert not started_by_cluster()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_nodes(
    cwd: Path, home: Path, *args: str, launcher: str = "torchrun", nodes: int = 2
) -> list[subprocess.CompletedProcess]:
    """``python -m trainer`` on ``nodes`` simulated nodes of one process each, on localhost:
    torchrun started once per node with its node rank, as on a cluster; or the processes that
    ``srun`` would start, with the variables it sets for each task."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(VISION_TRAINER_HOME=str(home), PYTHONPATH=str(REPO))
    trainer = [*args, "trainer.accelerator=cpu", "trainer.devices=1", f"trainer.num_nodes={nodes}",
               "trainer.strategy=ddp"]  # fmt: skip
    torchrun = [
        str(Path(sys.executable).with_name("torchrun")), f"--nnodes={nodes}", "--nproc-per-node=1",
        "--master-addr=127.0.0.1", f"--master-port={port}",
    ]  # fmt: skip
    slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": str(nodes),
             "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": str(nodes), "SLURM_LOCALID": "0",
             "SLURM_NODELIST": "localhost", "MASTER_PORT": str(port)}  # fmt: skip
    started = []
    for rank in range(nodes):
        if launcher == "torchrun":
            command, variables = [*torchrun, f"--node-rank={rank}", "-m", "trainer"], env
        else:
            task = {"SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)}
            command, variables = [sys.executable, "-m", "trainer"], {**env, **slurm, **task}
        started.append(subprocess.Popen(
            [*command, *trainer], cwd=cwd, env=variables, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    ended = []
    for process in started:
        try:
            stdout, stderr = process.communicate(timeout=240)
        finally:
            process.kill()
        ended.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return ended


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_two_nodes_are_one_operation_billed_for_two_nodes(
    launcher: str, tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    budget = 16  # 28.8 s on 2 nodes
    node0, node1 = on_nodes(
        tmp_path, trainer_home, *FAST, f"dataset.path={tiny_shapes}", "display_name=nodes",
        f"budget.train_budget_milli_node_hours={budget}", "budget.disable_early_stopping=true",
        "budget.save_reserve_seconds=auto",  # measured reserves: a fixed 4 s overran under load
        launcher=launcher,
    )  # fmt: skip
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    assert "rank 1 follows the operation" in node1.stderr
    (run_dir,) = run_dirs(tmp_path)
    # The other node's own Hydra run directory is gone: the training has one.
    assert [p.parent for p in tmp_path.glob("runs/*/*/.hydra")] == [run_dir]
    meta = read_json(run_dir / "model.json")[META]
    assert meta["nodeCount"] == "2" and meta["stopReason"] == "BUDGET_REACHED"
    spent = read_json(run_dir / "state.json")["spent_seconds"]
    cost = int(meta["trainCostMilliNodeHours"])
    assert cost == math.ceil(spent * 2 / 3.6) <= budget  # both nodes billed
    assert cost > math.ceil(spent / 3.6)
    assert read_json(run_dir / "state.json")["global_step"] > 0


@pytest.mark.slow
def test_a_torchrun_rank_zero_that_refuses_releases_the_other_nodes(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    node0, node1 = on_nodes(
        tmp_path, trainer_home, *FAST, f"dataset.path={tiny_shapes}",
        "budget.train_budget_milli_node_hours=2", "budget.save_reserve_seconds=60",
    )  # fmt: skip
    assert node0.returncode != 0 and "too small" in node0.stderr, node0.stderr[-2000:]
    assert node1.returncode == 0, node1.stderr[-2000:]  # not left waiting for a brief
    assert "nothing to follow" in node1.stderr
    assert run_dirs(tmp_path) == []


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

    # Trained further on two processes: a new model from the base's best checkpoint.
    further = run_trainer(
        *FAST, *DDP, f"dataset.path={tiny_shapes}", f"base_model_id={model['name']}",
        "budget.train_budget_milli_node_hours=12", "budget.disable_early_stopping=true",
        cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    assert further.returncode == 0, further.stderr[-3000:]
    assert "rank 1 follows the operation" in further.stderr
    base_step = checkpoint_step(run_dir / "checkpoints" / "best.ckpt")
    assert f"global step {base_step})" in further.stderr  # from the base, not from scratch
    new = read_json(run_dir_of(tmp_path, json.loads(further.stdout)) / "model.json")
    assert new[META]["baseModelId"] == model["name"].rsplit("/", 1)[1] != new["name"]
    assert int(new[META]["trainCostMilliNodeHours"]) <= 12
    assert len(run_dirs(tmp_path)) == 2
