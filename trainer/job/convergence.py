"""When training has converged: early stopping on a smoothed metric, after lowering the rate.

Two things made short trainings stop long before they had converged
(``benchmarks/time_to_accuracy.py``):

- A validation metric on a small split is noisy: one lucky pass sets a best that the next five
  do not beat although the model is still improving. Decisions therefore follow the median of
  the metric over the last ``smoothing_window`` passes, logged beside it as
  ``<metric>_smoothed``; the best checkpoint is chosen by the metric itself, the same metric
  (``task.convergence_monitor``), so that convergence and the model kept agree.
- At the optimizer's starting learning rate the metric often stalls while a lower rate would
  improve it. After ``lr_drop_patience`` passes without improvement the rate is multiplied by
  ``lr_drop_factor`` (torch's ``ReduceLROnPlateau``), up to ``lr_drops`` times.

Training stops with MODEL_CONVERGED after ``patience`` passes without improvement (Lightning's
``EarlyStopping``), counted afresh after each drop, so that the lower rate has a whole patience
to break the plateau, and a plateau it cannot break is still a plateau. Until the metric first
improves on its first pass, ``patience_before_first_gain`` passes: a first pass at chance may be
a lucky one that a network still starting cannot beat for a while.

- The first time the patience runs out, the rate anneals instead (``anneal_before_stopping``):
  it falls to its floor over one patience's steps (``BudgetDecay.anneal``), and the patience is
  counted afresh. A plateau at a high rate is that rate's noise floor, not convergence: generated
  shapes at 60 milli-node-hours were called converged at cost 38, with the budget's rate still
  at 40% of its start, 0.978 on a 1,200-image hold-out where the same training run to its
  budget's end reached 0.996.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch.optim.lr_scheduler import ReduceLROnPlateau

from trainer.settings import EarlyStoppingSettings, MetricMode

log = logging.getLogger("trainer")


def smoothed_name(monitor: str) -> str:
    return f"{monitor}_smoothed"


def steps_per_pass(trainer: Trainer) -> int | None:
    """Optimizer steps in a training pass, None where Lightning does not know (an iterable
    without a length)."""
    batches = trainer.num_training_batches
    return None if batches == float("inf") else int(batches)


class SmoothedMetric(Callback):
    """Puts the median of ``monitor`` over the last ``window`` passes in the callback metrics.

    A median rather than a moving average: one outlying pass moves it little, and on a true
    plateau it is flat at once, where an average would creep towards the plateau and look like
    a slow improvement for many passes. Until the median first improves on its first value,
    early stopping waits ``patience_before_first_gain`` passes instead of its patience: a first
    pass at chance may have been a lucky one (a third of 15 clips) that a network still starting
    cannot beat for a while. It must come before the callbacks that read it (Lightning calls
    them in list order).
    """

    def __init__(
        self,
        monitor: str,
        window: int,
        mode: MetricMode = "max",
        early_stopping: EarlyStopping | None = None,
        patience_before_first_gain: int | None = None,
        min_patience_steps: int = 0,
    ) -> None:
        self.monitor, self.window, self.sign = monitor, max(1, window), 1 if mode == "max" else -1
        self.name = smoothed_name(monitor)
        # Of an even count, the middle value on the worse side: two passes, one of them lucky,
        # do not make a best.
        self.median = statistics.median_low if mode == "max" else statistics.median_high
        self.early_stopping = early_stopping
        patience = early_stopping.patience if early_stopping else 0
        self.configured = (patience, patience_before_first_gain)
        self.min_patience_steps = min_patience_steps
        self.patience, self.slow_patience = self._patiences(pass_steps=None)
        self.recent: list[float] = []
        self.first: float | None = None  # the first median
        self.gained = False  # a median has improved on the first since
        self.value: float | None = None  # the last median

    def _patiences(self, pass_steps: int | None) -> tuple[int, int]:
        """Passes of patience, and of patience before the first gain: at least
        ``min_patience_steps`` optimizer steps, once the steps of a pass are known."""
        patience, slow = self.configured
        if pass_steps:
            patience = max(patience, math.ceil(self.min_patience_steps / pass_steps))
        return patience, max(slow or 2 * patience, patience)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.patience, self.slow_patience = self._patiences(steps_per_pass(trainer))
        if self.early_stopping is not None:
            self.early_stopping.patience = self.patience if self.gained else self.slow_patience

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or self.monitor not in metrics:
            return
        self.recent = [*self.recent, float(metrics[self.monitor])][-self.window :]
        self.value = self.median(self.recent)
        self.first = self.value if self.first is None else self.first
        self.gained = self.gained or self.sign * (self.value - self.first) > 0
        if self.early_stopping is not None:
            self.early_stopping.patience = self.patience if self.gained else self.slow_patience
        # Lightning keeps this dict between passes and only adds what modules log to it.
        metrics[self.name] = torch.tensor(self.value)
        if trainer.logger is not None:
            trainer.logger.log_metrics({self.name: self.value}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "first": self.first, "gained": self.gained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.recent = [float(v) for v in state_dict.get("recent", [])]
        self.first, self.gained = state_dict.get("first"), bool(state_dict.get("gained"))
        self.value = self.median(self.recent) if self.recent else None


class LearningRateDrop(Callback):
    """``ReduceLROnPlateau`` driven by the monitored metric after each validation pass.

    It starts counting once the smoothed metric has improved on its first value (``SmoothedMetric``
    keeps that): a network trained from scratch often sits at chance for a few passes before it
    learns at all, and lowering the rate then only slows the start. A callback rather than each
    module's ``configure_optimizers``: every task's module gets it alike, from the same config
    as early stopping. Its state is kept in checkpoints.
    """

    def __init__(
        self,
        smoothed: SmoothedMetric,
        mode: MetricMode,
        patience: int,
        factor: float,
        min_delta: float,
        max_drops: int,
        early_stopping: EarlyStopping | None = None,
    ) -> None:
        self.smoothed, self.monitor, self.mode = smoothed, smoothed.name, mode
        self.patience, self.factor, self.min_delta = patience, factor, min_delta
        self.max_drops, self.early_stopping = max_drops, early_stopping
        self.drops = 0
        self.plateau: ReduceLROnPlateau | None = None
        self._restored_plateau: dict[str, Any] | None = None

    @property
    def first(self) -> float | None:
        return self.smoothed.first

    @property
    def learning(self) -> bool:
        return self.smoothed.gained

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # torch counts the passes *beyond* its patience; ours are "after this many passes".
        self.plateau = ReduceLROnPlateau(
            trainer.optimizers[0],
            mode=self.mode,
            factor=self.factor,
            patience=max(self.patience - 1, 0),
            threshold=self.min_delta,
            threshold_mode="abs",
        )
        if self._restored_plateau:
            self.plateau.load_state_dict(self._restored_plateau)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or self.plateau is None or value is None:
            return
        if not self.learning or self.drops >= self.max_drops:
            return
        group = self.plateau.optimizer.param_groups[0]
        before = group["lr"]
        self.plateau.step(float(value))
        if group["lr"] < before:
            self.drops += 1
            log.info("learning rate lowered to %.3g (%s stalled)", group["lr"], self.monitor)
            if self.early_stopping is not None:
                # The lower rate gets a whole patience before training is called converged.
                self.early_stopping.wait_count = 0

    def state_dict(self) -> dict[str, Any]:
        plateau = self.plateau.state_dict() if self.plateau else self._restored_plateau
        return {"drops": self.drops, "plateau": plateau or {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.drops = int(state_dict.get("drops", 0))
        self._restored_plateau = state_dict.get("plateau") or None


class AnnealThenStop(EarlyStopping):
    """Lightning's early stopping, except that the first time its patience runs out it calls
    ``anneal`` with one patience's steps and counts the patience afresh (the module's docstring
    says why). Each rank decides alike: they see the same synchronized metric."""

    def __init__(self, *args: Any, anneal: Callable[[int], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anneal, self.annealed, self.pass_steps = anneal, False, 1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.pass_steps = steps_per_pass(trainer) or 1

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if not should_stop or self.annealed:
            return should_stop, reason
        if self.stopping_reason != EarlyStoppingReason.PATIENCE_EXHAUSTED:
            return should_stop, reason
        self.annealed, self.wait_count = True, 0
        self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        self.anneal(self.patience * self.pass_steps)
        log.info(
            "%s has not improved for %d passes: the learning rate anneals to its floor over"
            " the next %d before training is called converged", self.monitor, self.patience,
            self.patience,
        )  # fmt: skip
        return False, None

    @property
    def state_key(self) -> str:
        # Early stopping's own key: an operation checkpointed before the annealing existed (or
        # with it turned off) resumes its patience count.
        return super().state_key.replace(type(self).__qualname__, EarlyStopping.__qualname__, 1)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "annealed": self.annealed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.annealed = bool(state_dict.get("annealed"))


def passes_before_stopping(early_stopping: EarlyStopping) -> int:
    """Passes without improvement after which training would stop: what is left of the
    patience, and a whole patience more where the rate anneals first."""
    left = max(0, early_stopping.patience - early_stopping.wait_count)
    if isinstance(early_stopping, AnnealThenStop) and not early_stopping.annealed:
        left += early_stopping.patience
    return left


def convergence_callbacks(
    settings: EarlyStoppingSettings,
    monitor: str,
    mode: MetricMode,
    enabled: bool,
    anneal: Callable[[int], None] | None = None,
) -> list[Callback]:
    """The smoothed metric, the learning-rate drop (unless ``lr_drop_patience: null``) and early
    stopping (unless disabled: then training goes on until the budget is spent), in the order
    Lightning must call them, as ``conf/early_stopping/`` says. ``anneal`` brings the rate
    schedule's end forward (``BudgetDecay.anneal``), where ``anneal_before_stopping``."""
    name = smoothed_name(monitor)
    early_stopping: EarlyStopping | None = None
    if enabled:
        patience, min_delta = settings.patience, settings.min_delta
        if anneal is not None and settings.anneal_before_stopping:
            early_stopping = AnnealThenStop(name, min_delta, patience, mode=mode, anneal=anneal)
        else:
            early_stopping = EarlyStopping(name, min_delta, patience, mode=mode)
    smoothed = SmoothedMetric(
        monitor, settings.smoothing_window, mode, early_stopping,
        settings.patience_before_first_gain, settings.min_patience_steps,
    )  # fmt: skip
    callbacks: list[Callback] = [smoothed]
    if settings.lr_drop_patience:
        callbacks.append(
            LearningRateDrop(
                smoothed,
                mode,
                settings.lr_drop_patience,
                settings.lr_drop_factor,
                settings.min_delta,
                settings.lr_drops,
                early_stopping,
            )  # fmt: skip
        )
    return callbacks if early_stopping is None else [*callbacks, early_stopping]
