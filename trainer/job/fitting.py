"""The Lightning Trainer of a training and its callbacks, built alike on every rank.

Global rank 0 (``trainer/job/train.py``) adds what only the operation does: the progress and
cost on record, the cancel watch, the MLflow logger; the other ranks
(``trainer/job/distributed.py``) build the rest exactly as it does, so that every collective
of the callbacks is met on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import MLFlowLogger

from budgets import BudgetMeter
from budgets.callback import BudgetStopping
from budgets.schedule import BudgetDecay
from trainer.job.checkpoints import (
    AtomicCheckpointIO,
    CancelWatch,
    LatestBest,
    SafetyCheckpoints,
    StopRequest,
)
from trainer.job.convergence import convergence_callbacks
from trainer.job.progress import ProgressReport
from trainer.job.settings import lr_schedule


@dataclass
class Leader:
    """What only global rank 0 does during training: put the cost on record, watch for a
    cancel in the store, log to the operation's MLflow run."""

    flush: Callable[..., None]
    cancel_requested: Callable[[], bool]
    run_id: str


@dataclass
class FitParts:
    trainer: pl.Trainer
    budget: BudgetStopping
    checkpoints: LatestBest


def fit_parts(
    cfg: dict[str, Any], run_dir: Path, meter: BudgetMeter, reserves: Any, test_batches: int,
    stop: StopRequest, leader: Leader | None,
) -> FitParts:  # fmt: skip
    """The Lightning Trainer and its callbacks, alike on every rank (``leader`` None on the
    others): the budget, checkpoints, convergence, signals."""
    task = cfg["task"]
    budget = BudgetStopping(
        meter, test_batches, reserves.recording, checkpoint_seconds=reserves.checkpoint
    )
    # What says the model has converged also says which pass gave the best model.
    judge = task.get("convergence_monitor", task["monitor"])
    judge_mode = task.get("convergence_monitor_mode", task["monitor_mode"])
    checkpoints = LatestBest(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=judge,
        mode=judge_mode,
        reported=task["monitor"],
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    early = not cfg["budget"]["disable_early_stopping"]
    follow_budget, final_lr_factor = lr_schedule(cfg["optimizer"])
    decay = BudgetDecay(budget, final_lr_factor, follow_budget)
    convergence = convergence_callbacks(
        cfg["early_stopping"], judge, judge_mode, enabled=early, anneal=decay.anneal
    )
    early_stopping = next((c for c in convergence if isinstance(c, EarlyStopping)), None)
    progress = cancel_watch = logger = None
    if leader is not None:
        progress = ProgressReport(
            budget, task["monitor"], leader.flush, early_stopping,
            cfg["checkpoint"]["cost_flush_seconds"],
        )  # fmt: skip
        cancel_watch = CancelWatch(
            leader.cancel_requested, cfg["checkpoint"]["cancel_poll_seconds"], stop
        )
        logger = MLFlowLogger(
            experiment_name=cfg["mlflow"]["experiment_name"],
            tracking_uri=cfg["mlflow"]["tracking_uri"],
            run_id=leader.run_id,
        )
    safety = SafetyCheckpoints(
        run_dir / "checkpoints", cfg["checkpoint"]["every_minutes"], stop, agreement=budget
    )
    # The cancel watch comes before the budget callback, so that its time is part of the step
    # that the budget measures; the safety checkpoints after it, as they act on its agreement.
    callbacks = [cancel_watch, budget, safety, decay, checkpoints, progress, *convergence]
    trainer_cfg = cfg["trainer"]
    trainer = pl.Trainer(
        accelerator=trainer_cfg["accelerator"],
        devices=trainer_cfg["devices"],
        num_nodes=trainer_cfg["num_nodes"],
        strategy=trainer_cfg.get("strategy", "auto"),
        precision=trainer_cfg["precision"],
        max_epochs=-1,  # the budget and early stopping decide when training ends
        num_sanity_val_steps=1,  # also times one validation batch before training starts
        callbacks=[c for c in callbacks if c is not None],
        plugins=[AtomicCheckpointIO()],
        logger=logger or False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=trainer_cfg["log_every_n_steps"],
        default_root_dir=run_dir,
    )
    return FitParts(trainer, budget, checkpoints)
