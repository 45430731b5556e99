"""SIGTERM at any moment of training ends in a checkpoint and ``TrainingInterrupted``.

Lightning registers a SIGTERM handler of its own in every ``fit``; unless ours takes SIGTERM back,
a signal that arrives between our callbacks' checks makes Lightning raise ``SIGTERMException``, a
``SystemExit`` with exit status 0 and no checkpoint. These tests send the signal at such moments.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from trainer.job.checkpoints import LAST, SafetyCheckpoints, StopRequest, TrainingInterrupted


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SigtermAt(pl.Callback):
    """Sends SIGTERM to this process from a hook that runs after SafetyCheckpoints' check."""

    def __init__(self, hook: str, global_step: int) -> None:
        self.global_step = global_step
        self.sent = False
        setattr(self, hook, self._maybe_kill)

    def _maybe_kill(self, trainer: pl.Trainer, *args: Any) -> None:
        # Once only: a second signal exits at once, by design.
        if trainer.global_step == self.global_step and not (trainer.sanity_checking or self.sent):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def loader() -> DataLoader:
    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    return DataLoader(data, batch_size=4)  # 8 batches: training and validation both span several


@pytest.mark.parametrize(
    ("hook", "global_step", "stopped_at"),
    [
        ("on_train_batch_end", 3, 4),  # after our check for step 3: caught at the next step
        ("on_validation_batch_end", 8, 8),  # mid-validation: caught when validation ends
    ],
)
def test_sigterm_between_checks_is_checkpointed(
    tmp_path: Path, hook: str, global_step: int, stopped_at: int
) -> None:
    stop = StopRequest()
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[
            SafetyCheckpoints(tmp_path, every_minutes=60, stop=stop),
            SigtermAt(hook, global_step),
        ],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    stop.install()
    try:
        with pytest.raises(TrainingInterrupted) as raised:
            trainer.fit(Tiny(), loader(), loader())
    finally:
        stop.restore()
    assert raised.value.reason == "SIGTERM"
    assert raised.value.global_step == stopped_at
    saved = torch.load(tmp_path / LAST, map_location="cpu", weights_only=False)
    assert saved["global_step"] == stopped_at
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the run
