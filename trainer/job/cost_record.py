"""The cost of an operation on record: in its run directory at once, in the store soon after.

A kill -9 or a power loss loses at most ``checkpoint.cost_flush_seconds`` of cost: the
``CostFlusher`` writes it on a fixed schedule whatever the main thread is doing, and a resume
starts from what ``state.json`` holds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from budgets import BudgetMeter
from trainer.job.run_state import RunState
from trainer.settings import redact
from trainer.store.automl import Operation
from trainer.store.store import Store

log = logging.getLogger("trainer")


@dataclass
class CostRecord:
    """Where an operation's cost goes: operation.json and state.json, then the store."""

    meter: BudgetMeter
    state: RunState
    operation: Operation
    store: Store
    run_dir: Path
    _flushing: threading.Lock = field(default_factory=threading.Lock)
    _publishing: threading.Lock = field(default_factory=threading.Lock)
    # Set while a CostFlusher runs: wakes its publishing thread.
    _publish_soon: Callable[[], None] | None = None

    def flush(self, trainer: pl.Trainer | None = None) -> None:
        """Put the cost spent so far on record: the run directory's files, then the store."""
        self.save(trainer)
        self.publish()

    def flush_soon(self, trainer: pl.Trainer | None = None) -> None:
        """``flush``, the store's part left to the flusher's thread when one runs: the training
        loop does not wait for the store at each epoch (a remote tracking server's round trip,
        or 10 ms of SQLite)."""
        self.save(trainer)
        if self._publish_soon is None:
            self.publish()
        else:
            self._publish_soon()

    def save(self, trainer: pl.Trainer | None = None) -> None:
        """The cost so far into operation.json and state.json: quick local writes, the record
        a resume reads."""
        with self._flushing:
            self.operation.progress(self.meter.fraction_spent())
            if trainer is not None:
                self.state.global_step = trainer.global_step
            self.state.spent_seconds = self.meter.elapsed_seconds()
            self.state.save(self.run_dir)

    def publish(self) -> None:
        """The operation and its cost into the store, for other machines (it may be slow)."""
        with self._publishing:
            operation = json.loads(json.dumps(self.operation.resource))  # a consistent copy
            self.store.publish_operation(
                self.state.run_id, operation, self.state.status,
                spent_seconds=self.state.spent_seconds,
            )  # fmt: skip


class CostFlusher:
    """Puts the operation's cost on record every ``seconds``, whatever the main thread is doing:
    checking the dataset, building the cache, testing or recording (the training loop's own
    flushes cover only its steps). After a kill -9 the cost on record is at most that old.

    Two threads: one writes the run directory's files on a fixed schedule, the other publishes
    to the store, whose writes can take longer than the schedule allows on a busy machine. The
    schedule is every half of ``seconds``: a thread runs only when the main one lets go of the
    GIL, and some of torch's and MLflow's C++ calls hold it for most of a second (seen in
    benchmarks/chaos.py as kills during recording that lost 1.4 to 1.7 s of cost at a 1 s
    schedule).
    """

    def __init__(self, record: CostRecord, seconds: float) -> None:
        self.record, self.seconds = record, float(seconds) / 2
        self._stopped = threading.Event()
        self._publish_wanted = threading.Event()
        self._threads = [
            threading.Thread(target=self._save, name="cost-saver", daemon=True),
            threading.Thread(target=self._publish, name="cost-publisher", daemon=True),
        ]
        self._warned = False

    def __enter__(self) -> CostFlusher:
        for thread in self._threads:
            thread.start()
        self.record._publish_soon = self._publish_wanted.set
        return self

    def __exit__(self, *exc: Any) -> None:
        self.record._publish_soon = None
        self._stopped.set()
        self._publish_wanted.set()
        for thread in self._threads:
            thread.join()

    def _save(self) -> None:
        next_at = time.monotonic() + self.seconds
        while not self._stopped.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + self.seconds, time.monotonic())  # a fixed schedule
            self._guarded(self.record.save)
            self._publish_wanted.set()

    def _publish(self) -> None:
        while True:
            self._publish_wanted.wait()
            if self._stopped.is_set():
                return
            self._publish_wanted.clear()
            self._guarded(self.record.publish)

    def _guarded(self, work: Any) -> None:
        try:
            work()
        except Exception as error:  # a full disk or a store that is down must not end training
            if not self._warned:
                log.warning("could not put the cost on record (%s); retrying", redact(error))
                self._warned = True
