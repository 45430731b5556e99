"""How long saving work took on this machine lately, for the budget's reserves.

Two kinds of work cannot be measured before the budget callback must keep room for them:
recording the model after the TEST pass (building the evaluation, its files and plots, logging
the network and checkpoint to MLflow, registering the model) and the checkpoint writes of the
first epoch boundary. A fixed reserve has to cover a loaded machine and a slow store, 20 s by
default, which is most of a small budget (2 to 10 milli-node-hours are 7 to 36 s), and it was
kept twice before the first epoch. With ``budget.save_reserve_seconds=auto`` each reserve is
instead ``save_reserve_factor`` times the longest of the last few measurements of that work for
the same task and model type in this home, and ``save_reserve_first_seconds`` until there is one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        entry = self._read().get(self.key, {})
        values = entry.get(work, []) if isinstance(entry, dict) else []
        if not isinstance(values, list):
            return []
        return [float(s) for s in values if _is_duration(s)]

    def record(self, **seconds: float | None) -> None:
        """``record(recording=1.8, checkpoint=0.3)``; a None is not recorded."""
        # Trainings that end together may both write; one of their figures is then lost, which
        # only makes the next reserve rest on one measurement fewer.
        history = self._read()
        entry = history.get(self.key)
        entry = entry if isinstance(entry, dict) else {}
        for work, value in seconds.items():
            if value is not None:
                entry[work] = [*entry.get(work, []), round(value, 3)][-KEEP:]
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


def _is_duration(value: object) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0  # type: ignore[arg-type]


@dataclass
class SaveReserves:
    """Seconds the budget keeps for recording the model and for an epoch boundary's checkpoints."""

    recording: float
    checkpoint: float


def save_reserves(budget_cfg: dict[str, Any], history: WorkHistory) -> SaveReserves:
    """From ``budget.save_reserve_*`` (see the module's docstring); a number is used for both."""
    configured = budget_cfg["save_reserve_seconds"]
    if str(configured) != "auto":
        return SaveReserves(float(configured), float(configured))
    first = float(budget_cfg["save_reserve_first_seconds"])
    factor = float(budget_cfg["save_reserve_factor"])
    # A tiny figure in the file (edited, or from a much faster disk) must not shrink a reserve
    # to nothing: the budget would then be crossed by the work it stands for.
    floor = float(budget_cfg.get("save_reserve_floor_seconds", 1.0))

    def reserve(work: str) -> float:
        recent = history.recent(work)
        return max(floor, factor * max(recent)) if recent else first

    return SaveReserves(reserve(RECORDING), reserve(CHECKPOINT))
