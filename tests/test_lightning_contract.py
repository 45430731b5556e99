"""What the project's callbacks rely on in Lightning's private API: these fail the day Lightning
changes it, rather than a training quietly converging, checkpointing or resuming otherwise.

- ``AnnealThenStop`` (trainer/job/convergence.py) overrides
  ``EarlyStopping._evaluate_stopping_criteria`` and resets ``wait_count`` and
  ``stopping_reason``; ``SmoothedMetric`` and ``LearningRateDrop`` set an early stopping's
  ``patience`` and ``wait_count`` from outside, between validation passes.
- ``LatestBest`` (trainer/job/checkpoints.py) overrides ``ModelCheckpoint._update_best_and_save``
  and ``_save_checkpoint``, and sets ``_last_global_step_saved`` and ``_last_checkpoint_saved``
  when it links ``last.ckpt`` instead of writing it.
"""

from __future__ import annotations

import inspect

import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason


def parameters(method) -> list[str]:
    return list(inspect.signature(method).parameters)


def test_the_overridden_private_methods_keep_their_signatures() -> None:
    assert parameters(EarlyStopping._evaluate_stopping_criteria) == ["self", "current"]
    assert parameters(ModelCheckpoint._update_best_and_save) == [
        "self", "current", "trainer", "monitor_candidates",
    ]  # fmt: skip
    assert parameters(ModelCheckpoint._save_checkpoint) == ["self", "trainer", "filepath"]


def test_early_stopping_counts_wait_count_against_a_patience_that_may_change() -> None:
    """What the convergence callbacks do from outside: raise ``patience`` between passes, and
    reset ``wait_count``; the stop then comes when ``wait_count`` reaches the new patience."""
    early = EarlyStopping("m", min_delta=0.0, patience=2, mode="max")
    assert early._evaluate_stopping_criteria(torch.tensor(1.0))[0] is False  # the first best
    assert early._evaluate_stopping_criteria(torch.tensor(1.0))[0] is False  # wait_count 1
    early.patience = 3  # SmoothedMetric, before a gain or after min_patience_steps
    assert early._evaluate_stopping_criteria(torch.tensor(1.0))[0] is False  # wait_count 2
    assert early.wait_count == 2
    early.wait_count = 0  # LearningRateDrop, after a drop; AnnealThenStop, when it anneals
    for _ in range(2):
        assert early._evaluate_stopping_criteria(torch.tensor(1.0))[0] is False
    should_stop, reason = early._evaluate_stopping_criteria(torch.tensor(1.0))
    assert should_stop and reason and early.wait_count == 3
    assert early.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    early.stopping_reason = EarlyStoppingReason.NOT_STOPPED  # AnnealThenStop's reset
    assert "wait_count" in early.state_dict() and "patience" in early.state_dict()


def test_model_checkpoint_keeps_the_bookkeeping_that_a_linked_last_checkpoint_sets() -> None:
    checkpoint = ModelCheckpoint(save_last=True)
    assert checkpoint._last_global_step_saved == 0
    assert hasattr(checkpoint, "_last_checkpoint_saved")
    source = inspect.getsource(ModelCheckpoint._save_checkpoint)
    # Lightning's own save records the same two facts LatestBest records for a link.
    assert "_last_global_step_saved" in source and "_last_checkpoint_saved" in source
