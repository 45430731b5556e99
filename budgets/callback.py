"""The Lightning callback that stops training before the next unit of work would cross the budget.

Lightning's own ``max_time`` is checked after each step and then still runs a validation pass and
saves checkpoints, so it overshoots. This callback instead keeps, at every step, room for:

- the next training step,
- the epoch boundary that any stop triggers (Lightning validates and checkpoints when
  ``should_stop`` is set mid-epoch, and does so anyway at an epoch's end),
- the finalization after ``fit``: the evaluation on the TEST split and the saving of the model.
  An evaluation pass is its batches plus the work at its end (a detector's mean average
  precision is computed over the whole split there); that end-of-pass work is measured on
  validation and reserved twice, for the TEST pass and for the evaluation resources.

Each is measured as training goes; before the first measurement it is derived from the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from budgets.meter import BudgetMeter, WorkEstimator


class BudgetStopping(Callback):
    def __init__(
        self,
        meter: BudgetMeter,
        final_eval_batches: int,
        save_seconds: float,
        safety_factor: float = 1.25,
        checkpoint_seconds: float | None = None,
    ) -> None:
        """``save_seconds``: what the end of a training takes besides the TEST pass's batches
        (recording the model, mostly);
        ``checkpoint_seconds``: what an epoch boundary's checkpoint writes take before one is
        measured (``save_seconds`` when not given)."""
        self.meter = meter
        self.final_eval_batches = final_eval_batches
        self.save_seconds = save_seconds
        self.checkpoint_seconds = save_seconds if checkpoint_seconds is None else checkpoint_seconds
        self.step = WorkEstimator(safety_factor=safety_factor, warmup_samples=1)
        self.eval_batch = WorkEstimator(safety_factor=safety_factor)
        self.boundary = WorkEstimator(safety_factor=safety_factor)
        self.eval_epoch_end = WorkEstimator(safety_factor=safety_factor)
        # What a boundary takes beyond its validation pass: the checkpoint writes, mostly.
        self.boundary_saving = WorkEstimator(safety_factor=safety_factor)
        self._longest_saving: float | None = None  # of the whole training, not a window
        self._last_validation_seconds = 0.0
        self.stopped_by_budget = False
        self.steps_done = 0
        self._step_started: float | None = None
        self._last_step_ended: float | None = None
        self._eval_batch_started: float | None = None
        self._eval_started: float | None = None
        self._eval_batches_seconds = 0.0
        self._epoch_ended = False
        self.fraction_spent = 0.0  # of the training seconds, as the ranks agreed at the last step
        # Other callbacks' yes-or-no questions, decided with the budget at each step's end (any
        # rank's yes is everyone's, in ``agreed_votes``, in the same order).
        self.voters: list[Callable[[], bool]] = []
        self.agreed_votes: list[bool] = []

    # -- estimates -------------------------------------------------------------------------

    def eval_batch_estimate(self) -> float:
        # A forward pass costs less than a training step, so a step is a safe prior.
        return self.eval_batch.estimate(prior_seconds=self.step.estimate())

    def finalize_estimate(self) -> float:
        batches = self.final_eval_batches * self.eval_batch_estimate()
        return batches + 2 * self.eval_epoch_end.estimate(prior_seconds=0.0) + self.save_seconds

    def boundary_estimate(self, val_batches: int) -> float:
        validation = val_batches * self.eval_batch_estimate()
        recent = self.boundary.estimate(prior_seconds=validation + self.checkpoint_seconds)
        if self._longest_saving is None:
            return recent
        # A stop's boundary always writes a checkpoint (the final last.ckpt), where the recent
        # ones may have written none (no new best for a while): the longest write seen is
        # kept on top of a validation pass.
        validation += self.eval_epoch_end.estimate(prior_seconds=0.0)
        return max(recent, validation + self._longest_saving * self.boundary.safety_factor)

    def reserve_after_step(self, val_batches: int) -> float:
        """Seconds to keep after the next step: a stop's epoch boundary, then finalization."""
        return self.boundary_estimate(val_batches) + self.finalize_estimate()

    def training_fraction_spent(self, val_batches: int) -> float:
        """How much of the seconds that the budget leaves for training are spent: the elapsed
        seconds (earlier pieces of the operation included) over those and the seconds left
        before the last step that still fits."""
        elapsed = self.meter.elapsed_seconds()
        reserve = self.step.estimate() + self.reserve_after_step(val_batches)
        left = max(self.meter.remaining_seconds() - reserve, 0.0)
        return elapsed / (elapsed + left) if elapsed + left > 0 else 1.0

    def next_step_fits(self, val_batches: int) -> bool:
        return self.meter.fits(self.step.estimate() + self.reserve_after_step(val_batches))

    # -- Lightning hooks -------------------------------------------------------------------

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.meter.start()
        # Nothing measured yet: the first step is allowed if a stop right after it still fits.
        self._decide(trainer, fits=self.meter.fits(self.reserve_after_step(_val_batches(trainer))))

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = self.meter.clock()
        if self._epoch_ended and self._last_step_ended is not None:
            self.boundary.record(now - self._last_step_ended)
            saving = now - self._last_step_ended - self._last_validation_seconds
            self.boundary_saving.record(saving)
            self._longest_saving = max(saving, self._longest_saving or 0.0)
            self._last_validation_seconds = 0.0
        self._epoch_ended = False
        self._step_started = now

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = self.meter.clock()
        # A step is the whole cycle from the previous step's end: fetching the batch, the
        # forward and backward passes, and the hooks of callbacks listed before this one.
        within_epoch = batch_idx > 0 and self._last_step_ended is not None
        started = self._last_step_ended if within_epoch else self._step_started
        if started is not None:
            self.step.record(now - started)
        self._last_step_ended = now
        self.steps_done += 1
        self._decide(trainer, fits=self.next_step_fits(_val_batches(trainer)))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_ended = True

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._eval_started = self.meter.clock()
        self._eval_batches_seconds = 0.0

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Callbacks' on_validation_end runs after the module's epoch-end work.
        if self._eval_started is not None:
            total = self.meter.clock() - self._eval_started
            self.eval_epoch_end.record(max(total - self._eval_batches_seconds, 0.0))
            self._last_validation_seconds = total  # the boundary that follows includes it
            self._eval_started = None

    def on_validation_batch_start(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._eval_batch_started = self.meter.clock()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._eval_batch_started is not None:
            seconds = self.meter.clock() - self._eval_batch_started
            self.eval_batch.record(seconds)
            self._eval_batches_seconds += seconds

    # -- decision --------------------------------------------------------------------------

    def _decide(self, trainer: Trainer, fits: bool) -> None:
        spent = self.training_fraction_spent(_val_batches(trainer))
        votes = [float(not fits), spent, *(float(vote()) for vote in self.voters)]
        if trainer.world_size > 1:
            # One collective a step: every rank stops at the same step (any rank out of budget
            # stops them all), takes the furthest rank's share of the budget spent (the learning
            # rate follows it: replicas must step alike), and learns the other votes (a signal
            # or a cancel on any rank stops them all).
            tensor = torch.tensor(votes, device=trainer.strategy.root_device)
            votes = trainer.strategy.reduce(tensor, reduce_op="max").tolist()
        want_stop, self.fraction_spent = bool(votes[0]), float(votes[1])
        self.agreed_votes = [bool(vote) for vote in votes[2:]]
        if want_stop:
            self.stopped_by_budget = True
            trainer.should_stop = True


def _val_batches(trainer: Trainer) -> int:
    counts = getattr(trainer, "num_val_batches", None) or [0]
    return int(sum(c for c in counts if c != float("inf")))
