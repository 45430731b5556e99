"""Checkpoints that survive Ctrl-C, SIGTERM and kill -9.

- ``AtomicCheckpointIO`` writes every checkpoint to a temporary file, fsyncs it and renames it
  over the old one, keeping the old one as ``<name>.prev.ckpt``: a crash mid-write never leaves a
  truncated checkpoint. Lightning's own ``TorchCheckpointIO`` writes in place.
- ``SafetyCheckpoints`` writes ``last.ckpt`` every ``every_minutes`` of training (so long epochs
  are covered) and, when a stop is requested by a signal, writes it and raises
  ``TrainingInterrupted`` at the next step boundary.
- ``LatestBest`` is Lightning's ``ModelCheckpoint`` keeping the later of two equal scores. It
  also keeps ``last.ckpt``: beside each new best (as a hard link to it, not a second write) and
  at the end of training.
- ``StopRequest`` turns the first SIGINT or SIGTERM into that cooperative stop; a second one
  exits at once, leaving the last good checkpoint.

Lightning installs a SIGTERM handler of its own in every ``fit`` and ``test``; it raises
``SIGTERMException``, a ``SystemExit`` with no code (exit status 0), at points between our
callbacks' checks, without a checkpoint. ``SafetyCheckpoints`` takes SIGTERM back as soon as
each stage starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from trainer.settings import redact
from trainer.store.resources import file_sha256, fsync_directory

log = logging.getLogger("trainer")

LAST, BEST = "last.ckpt", "best.ckpt"


CANCEL = "CANCEL"  # a stop requested through the store (`operations cancel`), not a signal
# SIGUSR1 is what SLURM sends before a job's time limit (sbatch --signal=USR1@SECONDS); Lightning
# would save an hpc_ckpt and requeue on it, without the operation's cost (trainer/job/slurm.py).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(Exception):
    def __init__(self, reason: str, global_step: int) -> None:
        what = "cancelled" if reason == CANCEL else f"interrupted by {reason}"
        super().__init__(f"{what} at global step {global_step}")
        self.reason = reason
        self.global_step = global_step

    @property
    def cancelled(self) -> bool:
        return self.reason == CANCEL

    @property
    def exit_code(self) -> int:
        return 1 if self.cancelled else 128 + int(signal.Signals[self.reason])


def previous(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        temp = _temporary(path)
        try:
            with temp.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            _put_in_place(temp, path)
        finally:
            temp.unlink(missing_ok=True)


def link_checkpoint(source: Path, path: Path) -> None:
    """``path`` becomes the same file as ``source`` (a hard link; a copy where the filesystem
    has none), atomically, the old one kept as ``*.prev.ckpt``. Sharing a file is safe because
    no checkpoint is ever written in place: a new one is a new file renamed over the name."""
    temp = _temporary(path)
    temp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
            with temp.open("rb") as handle:
                os.fsync(handle.fileno())
        _put_in_place(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _temporary(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _put_in_place(temp: Path, path: Path) -> None:
    if path.exists():
        os.replace(path, previous(path))
    os.replace(temp, path)
    fsync_directory(path.parent)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents without running code it may carry: torch's weights-only
    unpickler builds tensors and plain containers and refuses anything else. Checkpoints come
    back from the store, which others may write to; a pickle is a program."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_first_good(
    candidates: list[Path], sha256: str | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The first candidate that loads (and, given the digest recorded with a model, is that
    model's checkpoint), warning about each one that does not."""
    for path in candidates:
        if not path.is_file():
            continue
        if sha256 and file_sha256(path) != sha256:
            log.warning("checkpoint %s is not the one recorded with the model (its SHA-256 "
                        "differs); trying the next one", path)  # fmt: skip
            continue
        try:
            return path, load_checkpoint(path)
        except Exception as error:  # a damaged or hostile file raises anything from pickle to zip
            log.warning("checkpoint %s does not load (%s); trying the previous one", path, error)
    return None


class LatestBest(ModelCheckpoint):
    """``ModelCheckpoint`` that, of two passes scoring alike, keeps the later one as the best,
    and remembers what ``reported`` (the task's headline metric) was at the best pass.

    Lightning keeps the first. On a small VALIDATE split scores tie often (generated shapes, 53
    images: accuracy 1.0 from pass 28 to pass 113 of a 60 milli-node-hour training), and the model
    trained longer, at a rate that has fallen with the budget, is the better one there: the first
    of those passes scored 0.978 on a 1,200-image hold-out.

    The best pass may be judged by another metric than the one reported (an image classifier's
    loss, its accuracy reported); ``reported_score`` is the reported metric of the model kept.

    ``last.ckpt`` (``save_last``): Lightning writes it only at a validation that wrote a new
    best, as a second file of the same state; here it is a hard link to that best (a write of
    18 MB saved, 0.045 s of each such pass for MobileNetV3-Small on 2 cores). And it is written
    at the end of training when its last pass was not a new best: a resume with a
    larger budget (a sweep's promotion) goes on from the final step, not from the last best.
    Between those, ``SafetyCheckpoints`` writes it every ``checkpoint.every_minutes``.
    """

    def __init__(self, *args: Any, reported: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reported = reported or self.monitor
        self.reported_score: float | None = None
        self._best_written_at: int | None = None  # the global step of the last best written

    @property
    def state_key(self) -> str:
        # ModelCheckpoint's key: checkpoints written before this class existed resume with it.
        return ModelCheckpoint.__name__ + super().state_key.removeprefix(type(self).__qualname__)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reported_score": self.reported_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.reported_score = state_dict.get("reported_score")

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        # Set before the save, so that the checkpoint written holds it.
        value = monitor_candidates.get(self.reported) if self.reported else None
        self.reported_score = None if value is None else float(value)
        super()._update_best_and_save(current, trainer, monitor_candidates)
        self._best_written_at = trainer.global_step

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        beside_best = Path(filepath).name == LAST and self._best_written_at == trainer.global_step
        # Only where every write makes a new file: one in place would change both names.
        atomic = isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        if not (beside_best and atomic):  # a best written at this step has its path set
            super()._save_checkpoint(trainer, filepath)
            return
        if trainer.is_global_zero:
            link_checkpoint(Path(self.best_model_path), Path(filepath))
        trainer.strategy.barrier("LatestBest.link")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Run after the epoch's validation and after early stopping has judged it (Lightning
        # puts checkpoint callbacks last); ``should_stop`` is agreed on by every rank.
        ending = self.save_last and trainer.should_stop
        if ending and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def check_monitor_top_k(self, trainer: Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or self.save_top_k != 1 or not self.best_k_models:
            return super().check_monitor_top_k(trainer, current)
        best = self.best_k_models[self.kth_best_model_path]
        as_good = bool(current >= best if self.mode == "max" else current <= best)
        return trainer.strategy.reduce_boolean_decision(as_good)


class StopRequest:
    """The first SIGINT, SIGTERM or SIGUSR1, or a cancel, asks training to stop cleanly; a
    second signal exits at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.training_over = False  # then a stop request lets the model be recorded first
        self._saved: dict[int, Any] = {}

    def install(self) -> None:
        """Handle the stop signals here; called again, it takes them back from whoever
        replaced the handlers since, and ``restore`` still restores the first ones."""
        for signum in STOP_SIGNALS:
            previous = signal.signal(signum, self._on_signal)
            self._saved.setdefault(signum, previous)

    def restore(self) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        self._saved.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            # The last good checkpoint is intact: every write is atomic.
            os._exit(128 + signum)
        self.reason = signal.Signals(signum).name
        what = "recording the model first" if self.training_over else "checkpointing and stopping"
        log.warning("%s received: %s (again to exit at once)", self.reason, what)

    def cancel(self) -> None:
        if self.reason is None:
            self.reason = CANCEL
            log.warning("cancel requested: checkpointing and stopping")


class SafetyCheckpoints(Callback):
    """``agreement``: the budget callback, which decides at each step's end, on every rank at
    once, whether any rank was asked to stop or is due a save; this callback must come after it.
    A checkpoint write is a collective under DDP, and a stop must end every rank at the same step.
    """

    def __init__(
        self, checkpoint_dir: Path, every_minutes: float, stop: StopRequest, agreement: Any = None
    ) -> None:
        self.path = checkpoint_dir / LAST
        self.every_seconds = every_minutes * 60
        self.stop = stop
        self._last_save = time.monotonic()
        self.agreement = agreement
        if agreement is not None:
            agreement.voters.extend([self._stop_requested, self._save_due])

    # These hooks are the first to run after Lightning has registered its SIGTERM handler.
    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.install()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.install()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop.install()

    def _save(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.path)
        self._last_save = time.monotonic()

    def _stop_requested(self) -> bool:
        return self.stop.reason is not None

    def _save_due(self) -> bool:
        return time.monotonic() - self._last_save >= self.every_seconds

    def _stop(self, trainer: Trainer) -> None:
        self._save(trainer)
        # Stopped by another rank's request: a signal (a cancel is rank 0's own), which the
        # vote does not carry; SIGTERM, the one that clusters send, stands for it.
        raise TrainingInterrupted(self.stop.reason or "SIGTERM", trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.agreement is not None and self.agreement.agreed_votes:
            stop, save = self.agreement.agreed_votes[:2]
        else:
            stop, save = self._stop_requested(), self._save_due()
        if stop:
            self._stop(trainer)
        if save:
            self._save(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The clock is not reset here: a validation writes last.ckpt only beside a new best.
        # Under DDP a stop waits for the next step's agreement: one rank alone must not.
        if not trainer.sanity_checking and trainer.world_size == 1 and self._stop_requested():
            self._stop(trainer)


class CancelWatch(Callback):
    """Asks the store every ``every_seconds`` whether someone cancelled this operation.

    The request travels through the store, so a cancel works from any machine that shares the
    MLflow tracking server, not only by a signal on this one.
    """

    def __init__(self, cancelled: Callable[[], bool], every_seconds: float, stop: StopRequest):
        self.cancelled = cancelled
        self.every_seconds = every_seconds
        self.stop = stop
        self._last_poll = time.monotonic()
        self._warned = False

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if time.monotonic() - self._last_poll < self.every_seconds:
            return
        self._last_poll = time.monotonic()
        try:
            cancelled = self.cancelled()
        except Exception as error:  # the store unreachable a moment: ask again next time
            if not self._warned:
                log.warning("could not ask the store for a cancel request (%s); will retry",
                            redact(error))  # fmt: skip
                self._warned = True
            return
        if cancelled:
            self.stop.cancel()
