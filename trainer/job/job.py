"""What one training works with: its settings, where it starts, its cost on record, the phase
it is in. The operation (trainer/job/train.py) makes it; the phases (trainer/job/phases.py)
work with it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from budgets import BudgetMeter
from trainer.job.checkpoints import StopRequest
from trainer.job.continuation import StartFrom
from trainer.job.cost_record import CostRecord
from trainer.job.run_state import RunState
from trainer.settings import Settings
from trainer.store.automl import Operation, Parent
from trainer.store.store import Store

# What a training does before its first step, in order (Job.enter names them).
SETUP_PHASES = (
    "opening the operation", "checking the dataset", "preparing data", "building the network",
)  # fmt: skip


@dataclass
class Job:
    """What one training works with: its settings, where it starts, its cost on record."""

    settings: Settings
    start: StartFrom
    record: CostRecord
    stop: StopRequest
    run_dir: Path
    # Seconds of each set-up phase (metrics.json's setupSeconds): what every training pays
    # before its first step, and a sweep pays once per trial.
    setup_seconds: dict[str, float] = field(default_factory=dict)
    _phase_started: float = field(default_factory=time.monotonic)
    _phase: str = "opening the operation"

    @property
    def meter(self) -> BudgetMeter:
        return self.record.meter

    @property
    def state(self) -> RunState:
        return self.record.state

    @property
    def store(self) -> Store:
        return self.record.store

    @property
    def operation(self) -> Operation:
        return self.record.operation

    @property
    def budget(self) -> int:
        return self.settings.budget.train_budget_milli_node_hours

    @property
    def nodes(self) -> int:
        return self.settings.trainer.num_nodes

    @property
    def model_name(self) -> str:
        """The model's full name: in its operation's project and location."""
        return Parent.of_name(self.operation.name).name("models", self.state.model_id)

    def flush(self, trainer: Any = None) -> None:
        self.record.flush(trainer)

    def flush_soon(self, trainer: Any = None) -> None:
        self.record.flush_soon(trainer)

    def enter(self, phase: str, flush: bool = True) -> None:
        """Say what the operation is doing now (state.json's ``phase``), and put it on record;
        until training starts, time each phase for metrics.json's ``setupSeconds``."""
        now = time.monotonic()
        if self._phase in SETUP_PHASES:
            self.setup_seconds[self._phase] = round(now - self._phase_started, 3)
        self._phase, self._phase_started = phase, now
        self.state.phase = phase
        if flush:
            self.flush()
