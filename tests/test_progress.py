"""The live status line: redrawn at most twice a second, not at every step."""

from __future__ import annotations

import itertools

from trainer.job import progress
from trainer.job.progress import ProgressReport


class CountingStatus:
    def __init__(self) -> None:
        self.updates = 0

    def update(self, text: str) -> None:
        self.updates += 1


def test_the_live_status_is_not_redrawn_at_every_step(monkeypatch) -> None:
    # Reading the loss for the line waits for a GPU step to finish: 100 steps of 20 ms (2 s)
    # redraw it about four times, not 100.
    clock = itertools.count(start=1000.0, step=0.02)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    report = ProgressReport(None, "val_accuracy", lambda trainer: None, plain_every_seconds=1e9)
    report._status = CountingStatus()
    report.status_line = lambda trainer: "status"
    for _ in range(100):
        report.on_train_batch_end(None)
    assert 3 <= report._status.updates <= 5


def test_a_live_status_is_not_also_logged_as_plain_lines(monkeypatch) -> None:
    clock = itertools.count(start=1000.0, step=0.5)
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    flushed = []
    report = ProgressReport(None, "val_accuracy", flushed.append, plain_every_seconds=2.0)
    report._status = CountingStatus()
    report.status_line = lambda trainer: "status"
    logged = []
    report._report = logged.append
    for _ in range(20):  # 10 s of steps
        report.on_train_batch_end("trainer")
    assert logged == [] and report._status.updates >= 10
    assert 4 <= len(flushed) <= 6  # the operation's progress is still written every 2 s
