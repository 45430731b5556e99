"""When training is called converged: a smoothed metric, and a learning-rate drop before it.

The trainings here are real Lightning loops on a one-parameter module whose validation metric
follows a script, a second or two each.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from budgets.schedule import BudgetDecay
from tests.typed import budget, early_stopping
from trainer.job import convergence, work_history
from trainer.job.convergence import (
    AnnealThenStop,
    LearningRateDrop,
    SmoothedMetric,
    passes_before_stopping,
)
from trainer.job.work_history import WorkHistory


def convergence_callbacks(values: dict, *args, **kwargs) -> list[Callback]:
    """The callbacks of ``values``, the early_stopping settings this file's tests set."""
    return convergence.convergence_callbacks(early_stopping(values), *args, **kwargs)


def save_reserves(values: dict, *args, **kwargs) -> work_history.SaveReserves:
    """The reserves of ``values``, the budget settings this file's tests set."""
    return work_history.save_reserves(budget(values), *args, **kwargs)


class Scripted(LightningModule):
    """Validation accuracy at epoch ``e`` is ``script[e]``; training is a trivial SGD step."""

    def __init__(self, script: list[float], losses: list[float] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.script, self.losses = script, losses

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val_accuracy", self.script[min(self.current_epoch, len(self.script) - 1)])
        if self.losses:
            self.log("val_loss", self.losses[min(self.current_epoch, len(self.losses) - 1)])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def fit(
    script: list[float], callbacks: list, checkpointing: bool = False,
    losses: list[float] | None = None, plugins: list | None = None,
) -> tuple[Trainer, Scripted]:  # fmt: skip
    loader = DataLoader(TensorDataset(torch.ones(1, 1)), batch_size=1)
    module = Scripted(script, losses)
    trainer = Trainer(
        plugins=plugins,
        max_epochs=len(script), callbacks=callbacks, logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, loader, loader)
    return trainer, module


def config(
    window: int,
    patience: int,
    lr_drop_patience: int | None = None,
    lr_drops: int = 3,
    patience_before_first_gain: int | None = None,
) -> dict:
    return {
        "smoothing_window": window,
        "patience": patience,
        "min_delta": 0.0,
        "lr_drop_patience": lr_drop_patience,
        "lr_drop_factor": 0.2,
        "lr_drops": lr_drops,
        "patience_before_first_gain": patience_before_first_gain or 2 * patience,
    }


# One lucky pass (0.9 at epoch 2) on a small split, then steady improvement.
SPIKE_THEN_CLIMB = [0.1, 0.5, 0.9, 0.6, 0.65, 0.7, 0.72, 0.74, 0.76, 0.78, 0.8]


def test_one_lucky_pass_stops_training_on_the_raw_metric() -> None:
    callbacks = convergence_callbacks(config(1, 3), "val_accuracy", "max", enabled=True)
    trainer, _ = fit(SPIKE_THEN_CLIMB, callbacks)
    assert trainer.current_epoch == 6  # stopped after the three passes that follow the spike


def test_the_smoothed_metric_keeps_a_climbing_model_training() -> None:
    callbacks = convergence_callbacks(config(3, 3), "val_accuracy", "max", enabled=True)
    trainer, _ = fit(SPIKE_THEN_CLIMB, callbacks)
    early_stopping = next(c for c in callbacks if isinstance(c, EarlyStopping))
    assert early_stopping.stopped_epoch == 0
    assert trainer.current_epoch == len(SPIKE_THEN_CLIMB)
    smoothed = next(c for c in callbacks if isinstance(c, SmoothedMetric))
    assert smoothed.value == pytest.approx(0.78)  # the median of the last three passes
    assert float(trainer.callback_metrics["val_accuracy_smoothed"]) == pytest.approx(smoothed.value)


def test_a_slow_start_gets_more_passes_before_its_first_gain() -> None:
    # From scratch, near chance for a few passes: the median first improves at epoch 5.
    script = [0.13, 0.13, 0.07, 0.13, 0.13, 0.2, 0.27, 0.4, 0.6, 0.8]
    impatient = config(3, 4, patience_before_first_gain=4)
    trainer, _ = fit(script, convergence_callbacks(impatient, "val_accuracy", "max", True))
    assert trainer.current_epoch == 5
    callbacks = convergence_callbacks(config(3, 4), "val_accuracy", "max", enabled=True)
    trainer, _ = fit(script, callbacks)
    assert trainer.current_epoch == len(script)
    assert next(c for c in callbacks if isinstance(c, EarlyStopping)).patience == 4


def test_a_lucky_first_pass_gives_a_network_still_at_chance_more_passes() -> None:
    # 15 validation clips at chance: 0.33 first, then nothing better for five passes.
    script = [0.33, 0.27, 0.13, 0.13, 0.07, 0.33, 0.27, 0.47, 0.6, 0.8, 0.9, 0.95]
    callbacks = convergence_callbacks(config(3, 5), "val_accuracy", "max", enabled=True)
    trainer, _ = fit(script, callbacks)
    assert trainer.current_epoch == len(script)
    never = convergence_callbacks(config(3, 5), "val_accuracy", "max", enabled=True)
    trainer, _ = fit([0.33, 0.27, 0.13, 0.13, 0.07, 0.33] + [0.2] * 10, never)
    assert trainer.current_epoch == 11  # still stopped: after 10 passes without a first gain
    early_stopping = next(c for c in never if isinstance(c, EarlyStopping))
    assert early_stopping.patience == 10


def test_a_plateau_stops_training_on_the_smoothed_metric_too() -> None:
    callbacks = convergence_callbacks(config(3, 3), "val_accuracy", "max", enabled=True)
    trainer, _ = fit([0.2, 0.5, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7], callbacks)
    # The median reaches 0.7 at epoch 3 and stays there: three passes later, training stops.
    assert trainer.current_epoch == 7


class Rates(Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def annealing_callbacks(patience: int) -> tuple[list[Callback], Rates]:
    """Early stopping that anneals first, driving a constant schedule's ``BudgetDecay``."""
    decay = BudgetDecay(SimpleNamespace(fraction_spent=0.0), 0.02, follow_budget=False)  # type: ignore[arg-type]
    settings = {**config(1, patience), "anneal_before_stopping": True}
    rates = Rates()
    callbacks = convergence_callbacks(settings, "val_accuracy", "max", True, anneal=decay.anneal)
    return [decay, *callbacks, rates], rates


def test_the_first_plateau_anneals_the_rate_and_the_second_stops_training() -> None:
    plain = convergence_callbacks(config(1, 3), "val_accuracy", "max", enabled=True)
    assert fit([0.1, 0.5] + [0.5] * 20, plain)[0].current_epoch == 5  # best 1, then 2-4
    callbacks, rates = annealing_callbacks(3)
    trainer, _ = fit([0.1, 0.5] + [0.5] * 20, callbacks)
    # Epochs 2-4 exhaust the patience: the rate anneals over the next three steps (one a pass)
    # to 0.02 of itself, and epochs 5-7 are a whole patience again.
    assert trainer.current_epoch == 8
    assert rates.rates == pytest.approx([1.0] * 5 + [1 - 0.98 / 3, 1 - 2 * 0.98 / 3, 0.02])
    early_stopping = next(c for c in callbacks if isinstance(c, AnnealThenStop))
    fresh = AnnealThenStop("val_accuracy_smoothed", anneal=print)
    fresh.load_state_dict(copy.deepcopy(early_stopping.state_dict()))
    assert fresh.annealed  # a resumed training does not anneal twice


def test_the_annealing_early_stopping_keeps_its_state_under_early_stopping_s_key() -> None:
    # A checkpoint written before the annealing existed resumes the patience count.
    plain, annealing = (
        EarlyStopping("val_loss", mode="min"),
        AnnealThenStop("val_loss", anneal=print),
    )
    assert annealing.state_key == plain.state_key


def test_the_time_left_counts_the_annealing_s_patience_until_it_has_begun() -> None:
    plain = EarlyStopping("val_loss", patience=3)
    annealing = AnnealThenStop("val_loss", patience=3, anneal=print)
    plain.wait_count = annealing.wait_count = 1
    assert passes_before_stopping(plain) == 2
    assert passes_before_stopping(annealing) == 5
    annealing.annealed = True
    assert passes_before_stopping(annealing) == 2


def test_a_model_that_improves_while_the_rate_anneals_trains_on() -> None:
    callbacks, rates = annealing_callbacks(3)
    trainer, _ = fit([0.1, 0.5, 0.5, 0.5, 0.5, 0.6, 0.7] + [0.7] * 10, callbacks)
    assert trainer.current_epoch == 10  # annealed after epoch 4; best at 6; 7-9 a plateau
    assert rates.rates[-1] == pytest.approx(0.02)


def test_the_learning_rate_drops_after_each_plateau_even_without_early_stopping() -> None:
    callbacks = convergence_callbacks(config(1, 3, lr_drop_patience=2), "val_accuracy", "max",
                                      enabled=False)  # fmt: skip
    assert not any(isinstance(c, EarlyStopping) for c in callbacks)
    trainer, module = fit([0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], callbacks)
    assert trainer.current_epoch == 9
    # Epoch 1 improves on the first pass and sets the best; passes 2-3, 4-5 and 6-7 are three
    # plateaus of two passes each.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2**3)


def test_at_most_lr_drops_and_each_gives_the_lower_rate_a_whole_patience() -> None:
    callbacks = convergence_callbacks(config(1, 3, lr_drop_patience=2, lr_drops=2),
                                      "val_accuracy", "max", enabled=True)  # fmt: skip
    trainer, _ = fit([0.1, 0.5] + [0.5] * 20, callbacks)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.2**2)
    # Best at epoch 1; drops after epochs 3 and 5, each restarting the count of 3 with its own
    # pass; epochs 6 and 7 complete it (without the restarts it would end at epoch 4).
    assert trainer.current_epoch == 8


def test_no_drop_before_the_metric_first_improves() -> None:
    # From scratch, a network may sit at chance for a few passes before it learns at all.
    callbacks = convergence_callbacks(config(1, 3, lr_drop_patience=2), "val_accuracy", "max",
                                      enabled=False)  # fmt: skip
    trainer, _ = fit([0.17, 0.17, 0.17, 0.17, 0.5, 0.6, 0.7], callbacks)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 1.0


def test_no_drop_when_lr_drop_patience_is_null() -> None:
    callbacks = convergence_callbacks(config(1, 3), "val_accuracy", "max", enabled=False)
    assert not any(isinstance(c, LearningRateDrop) for c in callbacks)
    trainer, _ = fit([0.5] * 4, callbacks)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 1.0


def test_the_drop_s_and_the_average_s_state_survive_a_checkpoint() -> None:
    callbacks = convergence_callbacks(config(3, 9, 3), "val_accuracy", "max", enabled=True)
    fit([0.5, 0.6, 0.6, 0.6], callbacks)
    smoothed, drop = callbacks[0], callbacks[1]
    assert isinstance(drop, LearningRateDrop) and drop.plateau is not None
    # As a checkpoint keeps them: JSON-able state, loaded into fresh callbacks.
    states = [json.loads(json.dumps(c.state_dict())) for c in (smoothed, drop)]
    fresh = convergence_callbacks(config(3, 9, 3), "val_accuracy", "max", enabled=True)
    for callback, state in zip(fresh[:2], states, strict=True):
        callback.load_state_dict(state)
    assert fresh[0].recent == smoothed.recent == pytest.approx([0.6, 0.6, 0.6])
    assert fresh[1].learning and fresh[1].first == pytest.approx(0.5)
    assert fresh[0].gained and fresh[0].first == pytest.approx(0.5)
    module = Scripted([0.0])
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    fresh[1].on_train_start(type("T", (), {"optimizers": [optimizer]})(), module)
    assert fresh[1].plateau.num_bad_epochs == drop.plateau.num_bad_epochs > 0
    assert fresh[1].plateau.best == drop.plateau.best


# -- the save reserves learned from this machine ------------------------------------------------

BUDGET = {"save_reserve_seconds": "auto", "save_reserve_first_seconds": 20.0,
          "save_reserve_first_mb_per_second": 10.0, "save_reserve_factor": 2.0,
          "save_reserve_floor_seconds": 1.0}  # fmt: skip


def test_auto_reserves_are_the_first_values_until_something_is_measured(tmp_path) -> None:
    history = WorkHistory(tmp_path, "image_classification/mobile-low-latency-1")
    reserves = save_reserves(BUDGET, history)  # before the network is built: no bytes yet
    assert (reserves.recording, reserves.checkpoint) == (20.0, 1.0)
    # A fresh home's reserves grow with what the checkpoint holds: 30 MB at 10 MB/s.
    reserves = save_reserves(BUDGET, history, bytes_written=30e6)
    assert (reserves.recording, reserves.checkpoint) == (pytest.approx(23.0), pytest.approx(4.0))
    history.record(recording=1.5, checkpoint=None)
    reserves = save_reserves(BUDGET, history, bytes_written=30e6)
    assert (reserves.recording, reserves.checkpoint) == (3.0, pytest.approx(4.0))


def test_a_type_not_measured_yet_learns_from_the_tasks_other_types(tmp_path) -> None:
    measured = WorkHistory(tmp_path, "image_classification/mobile-low-latency-1")
    measured.record(10e6, recording=1.5, checkpoint=0.2)
    fresh = WorkHistory(tmp_path, "image_classification/mobile-versatile-1")
    # Three times the bytes: three times the measured seconds, times the factor (2).
    reserves = save_reserves(BUDGET, fresh, bytes_written=30e6)
    assert reserves.recording == pytest.approx(9.0) and reserves.checkpoint == pytest.approx(1.2)
    # A smaller network is not scaled down (the fixed part stays), the floor still holds.
    reserves = save_reserves(BUDGET, fresh, bytes_written=1e6)
    assert reserves.recording == pytest.approx(3.0) and reserves.checkpoint == pytest.approx(1.0)
    # Never above what a task with no measurement at all keeps for those bytes (20 s + 100 s).
    assert save_reserves(BUDGET, fresh, bytes_written=1e9).recording == pytest.approx(120.0)
    assert save_reserves(BUDGET, WorkHistory(tmp_path, "object_detection/x")).recording == 20.0
    # Its own measurement, once there is one, is what counts.
    fresh.record(30e6, recording=0.5, checkpoint=0.1)
    assert save_reserves(BUDGET, fresh, bytes_written=30e6).recording == pytest.approx(1.0)


def test_auto_reserves_follow_the_slowest_of_the_last_five(tmp_path) -> None:
    history = WorkHistory(tmp_path, "image_classification/cloud")
    for seconds in (9.0, 1.0, 2.0, 1.5, 1.0, 1.2):  # the 9 s one is the sixth from the end
        history.record(recording=seconds, checkpoint=seconds / 10)
    reserves = save_reserves(BUDGET, history)
    assert reserves.recording == pytest.approx(4.0)
    # 0.4 s measured, raised to budget.save_reserve_floor_seconds: a tiny recorded time (or an
    # edited work_seconds.json) must not shrink the reserve to nothing.
    assert reserves.checkpoint == pytest.approx(1.0)
    other = WorkHistory(tmp_path, "object_detection/cloud")  # another type: its own figures
    assert save_reserves(BUDGET, other).recording == 20.0


def test_a_number_is_used_for_both_and_a_damaged_file_is_ignored(tmp_path) -> None:
    history = WorkHistory(tmp_path, "image_classification/cloud")
    history.record(recording=1.0, checkpoint=0.1)
    reserves = save_reserves({**BUDGET, "save_reserve_seconds": 4}, history)
    assert (reserves.recording, reserves.checkpoint) == (4.0, 4.0)
    history.path.write_text("{not json")
    assert save_reserves(BUDGET, history).recording == 20.0
    history.record(recording=2.0)
    assert history.recent("recording") == [2.0]


def test_patience_counts_at_least_min_patience_steps() -> None:
    """On a dataset of few steps a pass, patience is at least ``min_patience_steps`` steps."""
    flat = [0.1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
    passes = config(1, 2)
    trainer, _ = fit(flat, convergence_callbacks(passes, "val_accuracy", "max", enabled=True))
    assert trainer.current_epoch == 4  # two passes after the gain at epoch 1
    steps = {**passes, "min_patience_steps": 5}  # one step a pass here: five passes
    trainer, _ = fit(flat, convergence_callbacks(steps, "val_accuracy", "max", enabled=True))
    assert trainer.current_epoch == 7


def test_of_two_equal_scores_the_later_pass_is_kept_as_the_best(tmp_path) -> None:
    from trainer.job.checkpoints import LatestBest

    best = LatestBest(tmp_path, "best", monitor="val_accuracy", mode="max", save_top_k=1)
    assert best.state_key.startswith("ModelCheckpoint{")  # older checkpoints resume with it
    fit([0.2, 0.8, 0.5, 0.8, 0.6], [best], checkpointing=True)
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["epoch"] == 3


def test_the_best_pass_is_judged_by_the_loss_and_its_accuracy_reported(tmp_path) -> None:
    """An image classifier's best model is the pass with the lowest validation loss, not one
    whose accuracy on a small split jumped; best_val_accuracy is that pass's accuracy."""
    from trainer.job.checkpoints import LatestBest

    best = LatestBest(
        tmp_path, "best", monitor="val_loss", mode="min", reported="val_accuracy", save_top_k=1
    )
    fit([0.2, 0.9, 0.5, 0.7], [best], checkpointing=True, losses=[1.0, 0.8, 0.6, 0.7])
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert saved["epoch"] == 2
    assert best.reported_score == 0.5
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint"))
    assert state["reported_score"] == 0.5  # a resumed training reports it too
    again = LatestBest(
        tmp_path, "best", monitor="val_loss", mode="min", reported="val_accuracy", save_top_k=1
    )
    again.load_state_dict(state)
    assert again.reported_score == 0.5


def test_last_is_a_link_beside_a_new_best_and_the_final_step_when_training_stops(tmp_path) -> None:
    """Lightning writes last.ckpt only at a pass that wrote a new best, so a training that ended
    on a worse pass left last.ckpt at an earlier step: a resume with a larger budget (a sweep's
    promotion) would have trained those steps again."""
    import os

    from trainer.job.checkpoints import AtomicCheckpointIO, LatestBest

    best = LatestBest(
        tmp_path, "best", monitor="val_accuracy", mode="max", save_last=True, save_top_k=1,
        enable_version_counter=False,
    )  # fmt: skip
    early = EarlyStopping("val_accuracy", mode="max", patience=1)
    trainer, _ = fit(
        [0.2, 0.8, 0.5, 0.4], [best, early], checkpointing=True, plugins=[AtomicCheckpointIO()]
    )
    assert trainer.global_step == 3  # stopped after the pass at 0.5
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
    assert torch.load(tmp_path / "best.ckpt", weights_only=True)["global_step"] == 2
    # At the new best, last.ckpt was that same file, not a second write of it.
    assert os.path.samefile(tmp_path / "last.prev.ckpt", tmp_path / "best.ckpt")
