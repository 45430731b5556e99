"""Several processes, one training (DDP): global rank 0 is the operation, the others follow.

Lightning's launcher (``trainer.strategy=ddp`` with ``trainer.devices=N``) starts the other
ranks from inside ``trainer.fit``, as copies of the command with rank 0's environment and its
Hydra run directory. Left alone, each would open an operation, an MLflow run and a model of its
own, and evaluate its shard of the TEST split. Here rank 0 alone opens, records and writes the
store and the run directory's files. Before ``fit`` it writes a brief into the run directory (the
settled config, the checkpoint to start from, the budget spent so far) and names it in the
environment that the other ranks inherit; a follower reads it, builds the same data, network
and callbacks, takes part in ``fit``, and leaves, having written nothing. After ``fit`` rank 0
tests alone, so that no TEST image is padded in twice or left out by a distributed sampler.

What the ranks decide together goes through the budget callback's one collective per step
(``budgets/callback.py``): any rank out of budget stops them all, and the learning rate follows
the furthest rank's share of the budget spent, so that every replica steps alike. Convergence
and the best checkpoint follow metrics that Lightning and torchmetrics reduce across ranks.

Torchrun and SLURM (``srun``, one task per device) start every rank themselves, on every node,
before rank 0 could write a brief. Then every rank joins the process group at once, as
Lightning's cluster environment for that launcher describes it (``join_cluster``); rank 0 does
its set-up while the others wait, and hands them the brief through a broadcast instead of a file
(another node need not see rank 0's disk for that). Lightning finds the group already there and
uses it. If rank 0 ends before training, it hands over nothing and the others leave quietly.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.settings import Settings, TrainerSettings
from trainer.store.resources import write_json_atomic

log = logging.getLogger("trainer")

BRIEF_ENV = "TRAINER_DISTRIBUTED_BRIEF"
BRIEF_FILE = "distributed_brief.json"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only one), from the variables that
    Lightning's launcher, torchrun and SLURM set."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    ranks = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, 0)) == 0 for name in ranks)


def started_by_cluster() -> bool:
    """Whether torchrun or SLURM's ``srun`` started this process as one of several ranks (from
    their variables alone: Lightning is not imported for a single process)."""
    if os.environ.get(BRIEF_ENV):
        return False  # a child of Lightning's own launcher
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return int(os.environ.get("WORLD_SIZE", 1)) > 1
    interactive = os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive")
    return int(os.environ.get("SLURM_NTASKS", 1)) > 1 and not interactive


def brief_to_follow() -> Path | None:
    """The brief file of a training that this process joins as a child of Lightning's
    launcher, else None (rank 0, a single process, or a rank that torchrun or srun started).

    A rank that another launcher started (``RANK`` set, or a node rank other than 0, with no
    brief) is refused, rank 0 included, which would otherwise wait for the others forever.
    """
    path = os.environ.get(BRIEF_ENV)
    if started_by_cluster():
        return None
    external = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if (external or not is_rank_zero()) and not path:
        raise UserError(
            "this process is one rank of a distributed training started by a launcher other "
            "than Lightning's, torchrun or srun: start it with trainer.strategy=ddp and "
            "trainer.devices=N (Lightning starts the other ranks), or under torchrun or srun"
        )
    return None if is_rank_zero() or path is None else Path(path)


_handover = {"pending": False}  # rank 0 of a cluster launch owes the others its brief


def join_cluster(facts: tuple[str, int, int]) -> int:
    """Join the process group of a torchrun or srun launch now, before ``fit``; return this
    process's global rank.

    The group is the one Lightning would make (same environment, address, backend); made now,
    it carries rank 0's brief, and Lightning's DDP finds it and goes on with it. The timeout
    covers rank 0's set-up, a cache build included, which the others wait through. ``facts``:
    the accelerator, the budget and the nodes, as the command line gives them.
    """
    import datetime

    import torch
    import torch.distributed

    environment = _cluster_environment()
    os.environ.setdefault("MASTER_ADDR", environment.main_address)
    os.environ.setdefault("MASTER_PORT", str(environment.main_port))
    accelerator, budget, nodes = facts
    gpu = accelerator != "cpu" and torch.cuda.is_available()
    if gpu:  # NCCL needs each rank on its own device before the first collective
        torch.cuda.set_device(environment.local_rank())
    from budgets import BudgetMeter

    meter = BudgetMeter(budget, nodes)
    torch.distributed.init_process_group(
        "nccl" if gpu else "gloo",
        rank=environment.global_rank(),
        world_size=environment.world_size(),
        timeout=datetime.timedelta(seconds=meter.limit_seconds() + 600),
    )
    rank = environment.global_rank()
    _handover["pending"] = rank == 0
    return rank


def _cluster_environment() -> Any:
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    return SLURMEnvironment()


def receive_brief() -> dict[str, Any] | None:
    """A rank that torchrun or srun started: rank 0's brief, once its set-up is done (None if
    it ended before training)."""
    return _broadcast_json(None)


def release_followers() -> None:
    """Rank 0 of a cluster launch that ends without handing over a brief (a refused budget, a
    failed set-up): tell the others, which would otherwise wait for it until the timeout."""
    if _handover["pending"]:
        _hand_over(None)


def _hand_over(brief: dict[str, Any] | None) -> None:
    _handover["pending"] = False
    _broadcast_json(brief)


def _broadcast_json(value: Any) -> Any:
    """Rank 0's ``value`` on every rank, sent as JSON bytes: torch's broadcast_object_list
    pickles, and a rank would unpickle whatever reaches it through the group's unauthenticated
    store and sockets. Its length goes first, then its bytes."""
    import torch
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"  # NCCL sends only what lies on the rank's own GPU
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
    sending = dist.get_rank() == 0
    payload = json.dumps(value).encode() if sending else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = torch.zeros(int(size.item()), dtype=torch.uint8, device=device)
    if sending:
        data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(data, src=0)
    return value if sending else json.loads(data.cpu().numpy().tobytes())


def may_launch_processes(trainer: TrainerSettings) -> bool:
    one_device = trainer.devices == 1 or str(trainer.devices) == "1"
    return trainer.num_nodes > 1 or not one_device


def write_brief(
    settings: Settings, run_dir: Path, job: Any, reserves: Any, start_checkpoint: str | None,
    network: Any,
) -> Path | None:  # fmt: skip
    """Before ``fit``: what the other ranks need, in the run directory and the environment
    they will inherit, or broadcast to the ranks that torchrun or srun started; None when this
    training runs in one process."""
    if not may_launch_processes(settings.trainer):
        return None
    from trainer.tasks.pretrained import PRETRAINED_NAMES

    path = run_dir / BRIEF_FILE
    brief = {
        "config": settings.to_dict(),  # the tracking URI redacted: followers log nothing
        "run_dir": str(run_dir.resolve()),
        "start_checkpoint": start_checkpoint,
        "pretrained_names": sorted(getattr(network, PRETRAINED_NAMES, ())),
        "warm_restart": bool(job.start.base_model_id) and job.start.state is None,
        "reserves": {"recording": reserves.recording, "checkpoint": reserves.checkpoint},
        "spent_seconds": job.meter.elapsed_seconds(),
        "written": time.time(),
    }
    write_json_atomic(path, brief, private=True)  # also a record of what the ranks started from
    if _handover["pending"]:
        _hand_over(brief)
    else:
        os.environ[BRIEF_ENV] = str(path)
    return path


def tester(trainer: Any, brief: Path | None) -> Any:
    """The Trainer that runs the TEST pass: after a distributed ``fit``, a one-device one on
    rank 0 (the other ranks have left), with the same logger and signal handling."""
    os.environ.pop(BRIEF_ENV, None)  # a later job of the same process starts afresh
    if brief is None or trainer.world_size == 1:
        return trainer
    import lightning.pytorch as pl
    import torch.distributed

    from trainer.job.checkpoints import AtomicCheckpointIO, SafetyCheckpoints

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # The best checkpoint is tested with the module's weights only: the callbacks that wrote
    # it, which Lightning warns are missing, take no part in a TEST pass.
    warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
    return pl.Trainer(
        accelerator=trainer.accelerator,
        devices=1,
        num_nodes=1,
        precision=trainer.precision,
        callbacks=[c for c in trainer.callbacks if isinstance(c, SafetyCheckpoints)],
        plugins=[AtomicCheckpointIO()],
        logger=trainer.logger or False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=trainer.default_root_dir,
    )


def follow_cluster_rank(own_run_dir: Path) -> float:
    """A rank other than 0 that torchrun or srun started: wait for rank 0's brief, follow it,
    and leave no run directory of its own (rank 0's is the training's)."""
    brief = receive_brief()
    if brief is None:
        log.info("rank 0 ended before training: nothing to follow")
        return 0.0
    brief["written"] = time.time()  # received now: another node's clock may differ
    run_dir = Path(brief["run_dir"])
    try:
        return follow(brief, run_dir)
    finally:
        if own_run_dir.resolve() != run_dir:
            import shutil  # Hydra made it for this process; it holds only Hydra's own files

            shutil.rmtree(own_run_dir, ignore_errors=True)


def follow(brief_or_path: Path | dict[str, Any], run_dir: Path) -> float:
    """Take part in rank 0's ``fit`` as described by its brief; write nothing, and return."""
    import torch.distributed

    from budgets import BudgetMeter
    from trainer.job.checkpoints import StopRequest, TrainingInterrupted
    from trainer.job.fitting import data_loaders, fit_parts, trained_module
    from trainer.job.work_history import SaveReserves
    from trainer.tasks import task_of

    brief = brief_or_path
    if isinstance(brief, Path):
        brief = json.loads(brief.read_text())
    settings = Settings.parse(brief["config"])
    # The meter goes on from rank 0's: the budget spent before the brief and since.
    spent = float(brief["spent_seconds"]) + max(0.0, time.time() - float(brief["written"]))
    meter = BudgetMeter(
        settings.budget.train_budget_milli_node_hours, settings.trainer.num_nodes,
        spent_before_seconds=spent,
    )  # fmt: skip
    meter.start()
    stop = StopRequest()
    kind = task_of(settings)
    manifest = kind.read_manifest(settings, check_files=False)
    loaders = data_loaders(settings, kind, manifest, _FollowerJob(meter, stop, meter.nodes))
    module = trained_module(
        settings, kind, manifest.labels, None,  # DDP hands it rank 0's weights
        bool(brief["warm_restart"]), frozenset(brief["pretrained_names"]),
    )  # fmt: skip
    reserves = SaveReserves(**brief["reserves"])
    parts = fit_parts(settings, run_dir, meter, reserves, len(loaders.test), stop, leader=None)
    log.info("rank %s follows the operation in %s", _rank_name(), run_dir)
    try:
        parts.trainer.fit(
            module, loaders.train, loaders.val, ckpt_path=brief["start_checkpoint"],
            weights_only=True,
        )  # fmt: skip
    except TrainingInterrupted as interruption:
        # Rank 0 records the interruption; a follower leaves quietly (an exit code other than
        # 0 would make Lightning's launcher kill rank 0 while it records).
        log.info("rank %s stopped: %s", _rank_name(), interruption)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0.0


def _rank_name() -> str:
    """This process's global rank as its launcher set it (Lightning's launcher sets the local
    rank only, on one machine)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if name in os.environ:
            return os.environ[name]
    return "?"


class _FollowerJob:
    """What a task's ``loaders`` reads of a job: the meter, the stop request, the nodes."""

    def __init__(self, meter: Any, stop: Any, nodes: int) -> None:
        self.meter, self.stop, self.nodes = meter, stop, nodes
