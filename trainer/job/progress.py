"""Progress on stderr while training, and the operation's progress on disk.

A terminal gets a live rich status line; anything else (a log file, CI) gets plain lines, one per
epoch and one every ``plain_every_seconds`` within long epochs.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping

from budgets.callback import BudgetStopping
from trainer.job.convergence import passes_before_stopping

log = logging.getLogger("trainer")
LIVE_EVERY_SECONDS = 0.5  # how often the live status line is redrawn


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressReport(Callback):
    def __init__(
        self,
        budget: BudgetStopping,
        monitor: str,
        on_progress: Callable[[Trainer], None],
        early_stopping: EarlyStopping | None = None,
        plain_every_seconds: float = 30.0,
    ) -> None:
        self.budget = budget
        self.early_stopping = early_stopping
        self._train_started = 0.0
        self.monitor = monitor
        self.on_progress = on_progress
        self.plain_every_seconds = plain_every_seconds
        self.live = sys.stderr.isatty()
        self._status: Any = None
        self._last_report = 0.0
        self._last_status = 0.0

    def status_line(self, trainer: Trainer) -> str:
        meter = self.budget.meter
        metrics = trainer.callback_metrics
        loss = metrics.get("train_loss")
        val = metrics.get(self.monitor)
        parts = [f"epoch {trainer.current_epoch}", f"step {trainer.global_step}"]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if val is not None:
            parts.append(f"{self.monitor} {float(val):.4f}")
        parts.append(
            f"{meter.cost_milli_node_hours()}/{meter.budget_milli_node_hours} milli-node-hours"
        )
        parts.append(f"~{format_seconds(self.seconds_left(trainer))} left")
        return " | ".join(parts)

    def seconds_left(self, trainer: Trainer) -> float:
        """The budget left, or less when early stopping would end training sooner: the epochs
        of patience left if the metric stops improving now, at the measured epoch time."""
        left = self.budget.meter.remaining_seconds()
        epochs_done = trainer.current_epoch
        if self.early_stopping is None or epochs_done == 0:
            return left
        epoch_seconds = (time.monotonic() - self._train_started) / epochs_done
        return min(left, passes_before_stopping(self.early_stopping) * epoch_seconds)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._train_started = time.monotonic()
        if self.live and trainer.is_global_zero:
            from rich.console import Console

            self._status = Console(stderr=True).status(self.status_line(trainer))
            self._status.start()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        now = time.monotonic()
        if self._status is not None:
            # Not every step: reading the loss off a GPU waits for the step to finish, which
            # would stop the CPU from queueing the next one.
            if now - self._last_status >= LIVE_EVERY_SECONDS:
                self._last_status = now
                self._status.update(self.status_line(trainer))
        elif now - self._last_report >= self.plain_every_seconds:
            self._report(trainer)
        if now - self._last_report >= self.plain_every_seconds:
            self._last_report = now
            self.on_progress(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._report(trainer)
        self._last_report = time.monotonic()
        self.on_progress(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def _report(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        if self._status is not None:
            self._status.console.log(self.status_line(trainer))
        else:
            log.info(self.status_line(trainer))
