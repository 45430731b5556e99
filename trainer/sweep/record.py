"""A sweep on record: ``<home>/sweeps/<ID>/`` holds ``sweep.json`` (its settings, space and
status), ``ledger.json`` (budgets/ledger.py), ``study.journal`` (Optuna's study) and
``trials/<number>.json`` (each trial's params, operation, rung and results). Only the sweep's
own process writes them; the ``sweeps`` verbs read them (no torch, no Optuna).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.store.resources import write_json_atomic

RUNNING, SUCCEEDED, CANCELLED, INTERRUPTED = "RUNNING", "SUCCEEDED", "CANCELLED", "INTERRUPTED"
ID_PREFIX = "SWP"


def sweeps_root(home: str | Path) -> Path:
    return Path(home) / "sweeps"


def sweep_folder(home: str | Path, sweep_id: str) -> Path:
    folder = sweeps_root(home) / sweep_id.removeprefix("sweeps/")
    if not (folder / "sweep.json").is_file():
        raise UserError(f"sweep {sweep_id} is not in {sweeps_root(home)}: list them with "
                        "python -m trainer sweeps list")  # fmt: skip
    return folder


@dataclass
class RungRecord:
    budget: int  # the cumulative budget granted for this rung
    cost: int  # the operation's cumulative cost when it ended
    value: float | None  # the monitored validation metric's best
    stop_reason: str
    global_step: int


@dataclass
class TrialRecord:
    number: int
    params: dict[str, Any]
    operation: str  # the operation's ID
    model: str  # the model's ID
    run_dir: str
    rung: int = 0  # the index of the rung it runs or last ran
    state: str = "RUNNING"  # the ledger's state, mirrored for the verbs
    pid: int | None = None
    slot: int = 0  # which of the sweep.parallel slots (and so which GPUs) it runs in
    results: list[RungRecord] = field(default_factory=list)

    @property
    def cost(self) -> int:
        return self.results[-1].cost if self.results else 0

    @property
    def value(self) -> float | None:
        return self.results[-1].value if self.results else None

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / "trials" / f"{self.number}.json", asdict(self))

    @classmethod
    def load(cls, path: Path) -> TrialRecord:
        data = json.loads(path.read_text())
        data["results"] = [RungRecord(**r) for r in data.get("results", [])]
        return cls(**data)


def read_sweep(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "sweep.json").read_text())


def write_sweep(folder: Path, sweep: dict[str, Any]) -> None:
    write_json_atomic(folder / "sweep.json", sweep)


def read_trials(folder: Path) -> list[TrialRecord]:
    paths = sorted((folder / "trials").glob("*.json"), key=lambda p: int(p.stem))
    return [TrialRecord.load(path) for path in paths]


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (ended, not yet reaped by its parent) is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def best_trial(trials: list[TrialRecord], maximize: bool) -> TrialRecord | None:
    """The trial with the best metric at the highest rung any trial reached with one."""
    scored = [t for t in trials if t.value is not None]
    if not scored:
        return None
    return max(scored, key=lambda t: (t.rung, t.value if maximize else -t.value))


def summary(folder: Path) -> dict[str, Any]:
    """The sweep as the verbs show it: its record, ledger figures and trials."""
    from budgets.ledger import SweepLedger

    sweep = read_sweep(folder)
    ledger = SweepLedger(folder / "ledger.json")
    trials = read_trials(folder)
    spent = ledger.spent()
    granted = sum(t.reserved for t in ledger.trials().values())
    if sweep["status"] == RUNNING and not process_alive(sweep.get("pid")):
        sweep["status"] = INTERRUPTED  # its process is gone: `sweeps resume` goes on
    best = best_trial(trials, sweep["maximize"])
    return {
        **sweep,
        "budgetMilliNodeHours": str(ledger.budget),
        "costMilliNodeHours": str(spent),
        "grantedMilliNodeHours": str(granted),
        "bestModelId": best.model if best else "",
        "trials": [{**asdict(t), "cost": t.cost, "value": t.value} for t in trials],
    }
