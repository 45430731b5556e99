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

Torchrun and SLURM start every rank themselves, before rank 0 could write a brief: not yet
supported; such a launch is refused on every rank with exit status 2.
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


def brief_to_follow() -> Path | None:
    """The brief of a training that this process joins as a rank other than 0, else None.

    A launcher that starts every rank itself (torchrun sets ``RANK`` and ``WORLD_SIZE``) is
    refused on every rank, rank 0 included, which would otherwise wait for the others forever.
    """
    path = os.environ.get(BRIEF_ENV)
    external = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if (external or not is_rank_zero()) and not path:
        raise UserError(
            "this process is one rank of a distributed training started by another launcher: "
            "start the training with trainer.strategy=ddp and trainer.devices=N on one machine, "
            "and Lightning starts the other ranks (torchrun and SLURM are not supported yet)"
        )
    return None if is_rank_zero() else Path(path)


def may_launch_processes(trainer_cfg: dict[str, Any]) -> bool:
    devices, nodes = trainer_cfg["devices"], int(trainer_cfg["num_nodes"])
    one_device = devices == 1 or devices == [0] or str(devices) == "1"
    return nodes > 1 or not one_device


def write_brief(
    cfg: dict[str, Any], run_dir: Path, job: Any, reserves: Any, start_checkpoint: str | None,
    network: Any,
) -> Path | None:  # fmt: skip
    """Before ``fit``: what the other ranks need, in the run directory and the environment
    they will inherit; None when this training runs in one process."""
    if not may_launch_processes(cfg["trainer"]):
        return None
    from trainer.tasks.pretrained import PRETRAINED_NAMES

    path = run_dir / BRIEF_FILE
    write_json_atomic(
        path,
        {
            "config": cfg,
            "start_checkpoint": start_checkpoint,
            "pretrained_names": sorted(getattr(network, PRETRAINED_NAMES, ())),
            "warm_restart": bool(job.start.base_model_id) and job.start.state is None,
            "reserves": {"recording": reserves.recording, "checkpoint": reserves.checkpoint},
            "spent_seconds": job.meter.elapsed_seconds(),
            "written": time.time(),
        },
    )
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


def follow(path: Path, run_dir: Path) -> float:
    """Take part in rank 0's ``fit`` as described by its brief; write nothing, and return."""
    import lightning.pytorch as pl
    import torch.distributed

    from budgets import BudgetMeter
    from trainer.job.checkpoints import StopRequest, TrainingInterrupted
    from trainer.job.fitting import fit_parts
    from trainer.job.work_history import SaveReserves
    from trainer.tasks import task_of
    from trainer.tasks.pretrained import PRETRAINED_NAMES

    brief = json.loads(path.read_text())
    cfg = brief["config"]
    # The meter goes on from rank 0's: the budget spent before the brief and since.
    spent = float(brief["spent_seconds"]) + max(0.0, time.time() - float(brief["written"]))
    budget_cfg = cfg["budget"]
    meter = BudgetMeter(
        int(budget_cfg["train_budget_milli_node_hours"]), int(cfg["trainer"]["num_nodes"]),
        spent_before_seconds=spent,
    )  # fmt: skip
    meter.start()
    stop = StopRequest()
    kind = task_of(cfg)
    manifest = kind.read_manifest(cfg, check_files=False)
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)
    loaders = kind.loaders(manifest, cfg, _FollowerJob(meter, stop, int(meter.nodes)))
    network = kind.network(cfg, manifest.labels, None)  # DDP hands it rank 0's weights
    setattr(network, PRETRAINED_NAMES, frozenset(brief["pretrained_names"]))
    module = kind.module(network, manifest.labels, cfg)
    module.warm_restart = bool(brief["warm_restart"])
    reserves = SaveReserves(**brief["reserves"])
    parts = fit_parts(cfg, run_dir, meter, reserves, len(loaders.test), stop, leader=None)
    log.info("rank %s follows the operation in %s", os.environ.get("LOCAL_RANK", "?"), run_dir)
    try:
        parts.trainer.fit(
            module, loaders.train, loaders.val, ckpt_path=brief["start_checkpoint"],
            weights_only=True,
        )  # fmt: skip
    except TrainingInterrupted as interruption:
        # Rank 0 records the interruption; a follower leaves quietly (an exit code other than
        # 0 would make Lightning's launcher kill rank 0 while it records).
        log.info("rank %s stopped: %s", os.environ.get("LOCAL_RANK", "?"), interruption)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0.0


class _FollowerJob:
    """What a task's ``loaders`` reads of a job: the meter, the stop request, the nodes."""

    def __init__(self, meter: Any, stop: Any, nodes: int) -> None:
        self.meter, self.stop, self.nodes = meter, stop, nodes
