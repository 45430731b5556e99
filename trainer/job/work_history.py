"""How long saving work took on this machine lately, for the budget's reserves.

Two kinds of work cannot be measured before the budget callback must keep room for them:
recording the model: everything after training but the TEST pass's batches (the TEST pass's
set-up, after DDP the switch to one process, building the evaluation, its files and plots, logging
the network and checkpoint to MLflow, registering the model) and the checkpoint writes of the
first epoch boundary. A fixed reserve has to cover a loaded machine and a slow store, 20 s by
default, which is most of a small budget (2 to 10 milli-node-hours are 7 to 36 s), and it was
kept twice before the first epoch. With ``budget.save_reserve_seconds=auto`` each reserve is
instead ``save_reserve_factor`` times the longest of the last few measurements of that work for
the same task and model type in this home. Before there is one, the other model types of the task
measured here stand in, scaled up by the bytes each training writes (a bigger network writes
more), but never above what a home with no measurement of the task at all keeps: a fixed part
(``save_reserve_first_seconds`` for recording, the floor for checkpoints) plus the checkpoint's
bytes at ``save_reserve_first_mb_per_second``. A fresh home's first 10 milli-node-hour training
of MobileNetV3-Small keeps about 11 s of its 36 for both (it kept 40 s, and was refused).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.settings import BudgetSettings
from trainer.store.resources import write_json_atomic

log = logging.getLogger("trainer")
KEEP = 5  # measurements remembered per kind of work, task and model type
FILE_NAME = "work_seconds.json"
RECORDING, CHECKPOINT = "recording", "checkpoint"


class WorkHistory:
    """The last ``KEEP`` durations of each kind of saving work of one task and model type."""

    def __init__(self, home: str | Path, key: str) -> None:
        self.path = Path(home) / FILE_NAME
        self.key = key

    def recent(self, work: str) -> list[float]:
        """The remembered durations that are durations: finite numbers above 0 (the file is in
        the home, where anything may have changed it)."""
        return _durations(self._read().get(self.key), work)

    def estimate(self, work: str, bytes_written: float | None) -> float | None:
        """The longest ``work`` measured for the task's other model types, each scaled up by
        ``bytes_written`` over the bytes that type writes (never down: a small network still
        pays the fixed part); None when none of them has been measured."""
        task = self.key.split("/")[0]
        found = []
        for key, entry in self._read().items():
            values = _durations(entry, work)
            if key == self.key or not key.startswith(f"{task}/") or not values:
                continue
            theirs = entry.get("bytes")
            scale = bytes_written / theirs if bytes_written and _is_duration(theirs) else 1.0
            found.append(max(values) * max(1.0, scale))
        return max(found) if found else None

    def record(self, bytes_written: float | None = None, **seconds: float | None) -> None:
        """``record(recording=1.8, checkpoint=0.3, bytes_written=...)``; a None is not
        recorded. ``bytes_written``: what a checkpoint of this type holds, for ``estimate``."""
        # Trainings that end together may both write; one of their figures is then lost, which
        # only makes the next reserve rest on one measurement fewer.
        history = self._read()
        entry = history.get(self.key)
        entry = entry if isinstance(entry, dict) else {}
        for work, value in seconds.items():
            if value is not None:
                entry[work] = [*entry.get(work, []), round(value, 3)][-KEEP:]
        if bytes_written:
            entry["bytes"] = int(bytes_written)
        history[self.key] = entry
        try:
            write_json_atomic(self.path, history)
        except OSError as error:
            log.warning("could not keep the saving times in %s: %s", self.path, error)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # none yet, or unreadable: the reserves fall back to their first value
        return data if isinstance(data, dict) else {}


def _durations(entry: object, work: str) -> list[float]:
    values = entry.get(work, []) if isinstance(entry, dict) else []
    return [float(s) for s in values if _is_duration(s)] if isinstance(values, list) else []


def _is_duration(value: object) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and value > 0


@dataclass
class SaveReserves:
    """Seconds the budget keeps for recording the model and for an epoch boundary's checkpoints."""

    recording: float
    checkpoint: float


def save_reserves(
    budget: BudgetSettings, history: WorkHistory, bytes_written: float | None = None
) -> SaveReserves:
    """From ``budget.save_reserve_*`` (see the module's docstring); a number is used for both.
    ``bytes_written``: what this training's checkpoint holds, once the network is built."""
    configured = budget.save_reserve_seconds
    if configured != "auto":
        return SaveReserves(configured, configured)
    factor = budget.save_reserve_factor
    # A tiny figure in the file (edited, or from a much faster disk) must not shrink a reserve
    # to nothing: the budget would then be crossed by the work it stands for.
    floor = budget.save_reserve_floor_seconds
    # What a home with no measurement keeps: a fixed part (recording logs, exports and
    # registers the model; a checkpoint is mostly its bytes) and the bytes at a slow disk's rate.
    writing = (bytes_written or 0.0) / (budget.save_reserve_first_mb_per_second * 1e6)
    first = {RECORDING: budget.save_reserve_first_seconds, CHECKPOINT: floor}

    def reserve(work: str) -> float:
        recent = history.recent(work)
        if recent:
            return max(floor, factor * max(recent))
        prior = first[work] + writing
        estimate = history.estimate(work, bytes_written)
        return prior if estimate is None else max(floor, min(prior, factor * estimate))

    return SaveReserves(reserve(RECORDING), reserve(CHECKPOINT))
