"""The Lightning Trainer of a training and its callbacks, built alike on every rank.

Global rank 0 (``trainer/job/train.py``) adds what only the operation does: the progress and
cost on record, the cancel watch, the MLflow logger; the other ranks
(``trainer/job/distributed.py``) build the rest exactly as it does, so that every collective
of the callbacks is met on every rank.
"""

from __future__ import annotations

import logging
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
from trainer.job.work_history import SaveReserves
from trainer.settings import MULTILABEL, Settings
from trainer.tasks import Loaders, Task
from trainer.tasks.pretrained import PRETRAINED_NAMES


class _NoAdvertising(logging.Filter):
    """Lightning's Trainer logs a tip to install a cloud logger each time it is built without
    one; the training's log is for its own progress."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


for _name in ("lightning.pytorch.utilities.rank_zero", "pytorch_lightning.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_NoAdvertising())


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


def data_loaders(settings: Settings, kind: Task, manifest: Any, job: Any) -> Loaders:
    """The task's loaders, seeded alike on every rank; ``job`` has the meter, the stop request
    and the nodes (a cache build is billed work)."""
    pl.seed_everything(settings.seed, workers=True, verbose=False)
    return kind.loaders(manifest, settings, job)


def trained_module(
    settings: Settings, kind: Task, labels: list[str], pretrained: Any, warm_restart: bool,
    pretrained_names: frozenset[str] | None = None,
) -> Any:  # fmt: skip
    """The LightningModule around the task's network, built alike on every rank: from checked
    local weights (``pretrained``), or to receive rank 0's (DDP hands them over) with the names
    of the layers that rank 0 loaded, which set the optimizer's groups."""
    network = kind.network(settings, labels, pretrained)
    if pretrained_names is not None:
        setattr(network, PRETRAINED_NAMES, pretrained_names)
    module = kind.module(network, labels, settings)
    module.warm_restart = warm_restart  # a training further warms its rate up again
    return module


def fit_parts(
    settings: Settings, run_dir: Path, meter: BudgetMeter, reserves: SaveReserves,
    test_batches: int, stop: StopRequest, leader: Leader | None,
) -> FitParts:  # fmt: skip
    """The Lightning Trainer and its callbacks, alike on every rank (``leader`` None on the
    others): the budget, checkpoints, convergence, signals."""
    task = settings.task
    budget = BudgetStopping(
        meter, test_batches, reserves.recording, checkpoint_seconds=reserves.checkpoint
    )
    # What says the model has converged also says which pass gave the best model; but a
    # MULTILABEL model's best pass is its monitor's (conf/task/*.yaml's multilabel).
    judge, judge_mode = task.convergence_monitor, task.convergence_monitor_mode
    best, best_mode = judge, judge_mode
    if settings.dataset.classification_type == MULTILABEL:
        best, best_mode = task.monitor, task.monitor_mode
    checkpoints = LatestBest(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=best,
        mode=best_mode,
        reported=task.monitor,
        save_last=True,
        save_top_k=1,
        enable_version_counter=False,
    )
    optimizer = settings.optimizer
    decay = BudgetDecay(budget, optimizer.final_lr_factor, optimizer.follows_budget)
    early = not settings.budget.disable_early_stopping
    convergence = convergence_callbacks(
        settings.early_stopping, judge, judge_mode, enabled=early, anneal=decay.anneal
    )
    early_stopping = next((c for c in convergence if isinstance(c, EarlyStopping)), None)
    progress = cancel_watch = logger = None
    checkpoint = settings.checkpoint
    if leader is not None:
        progress = ProgressReport(
            budget, task.monitor, leader.flush, early_stopping, checkpoint.cost_flush_seconds
        )
        cancel_watch = CancelWatch(leader.cancel_requested, checkpoint.cancel_poll_seconds, stop)
        logger = MLFlowLogger(
            experiment_name=settings.mlflow.experiment_name,
            tracking_uri=settings.mlflow.tracking_uri.reveal(),
            run_id=leader.run_id,
        )
    safety = SafetyCheckpoints(
        run_dir / "checkpoints", checkpoint.every_minutes, stop, agreement=budget
    )
    # The cancel watch comes before the budget callback, so that its time is part of the step
    # that the budget measures; the safety checkpoints after it, as they act on its agreement.
    callbacks = [cancel_watch, budget, safety, decay, checkpoints, progress, *convergence]
    return FitParts(_trainer(settings, run_dir, callbacks, logger), budget, checkpoints)


def _trainer(settings: Settings, run_dir: Path, callbacks: list[Any], logger: Any) -> pl.Trainer:
    trainer = settings.trainer
    return pl.Trainer(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=trainer.strategy,
        precision=trainer.precision,  # type: ignore[arg-type]  # settled: no longer auto
        max_epochs=-1,  # the budget and early stopping decide when training ends
        num_sanity_val_steps=1,  # also times one validation batch before training starts
        callbacks=[c for c in callbacks if c is not None],
        plugins=[AtomicCheckpointIO()],
        logger=logger or False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=trainer.log_every_n_steps,
        default_root_dir=run_dir,
    )
