"""A sweep on record: ``<home>/sweeps/<ID>/`` holds ``sweep.json`` (its settings, space and
status), ``ledger.json`` (budgets/ledger.py), ``study.journal`` (Optuna's study) and
``trials/<number>.json`` (each trial's params, operation, rung and results). Only the sweep's
own process writes them, except ``sweeps cancel``'s request; the ``sweeps`` verbs read them (no
torch, no Optuna).

On disk the records are camelCase JSON, as every sweep so far wrote them; in memory they are
the typed objects below, read and written only through their ``from_json`` and ``to_json``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from budgets.ledger import SweepLedger, TrialState
from trainer.errors import UserError
from trainer.settings import redact
from trainer.store.resources import write_json_atomic
from trainer.sweep import liveness

ID_PREFIX = "SWP"


class SweepStatus(str, Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"  # never written: a RUNNING sweep whose process is gone


def sweeps_root(home: str | Path) -> Path:
    return Path(home) / "sweeps"


def sweep_folder(home: str | Path, sweep_id: str) -> Path:
    """A sweep's folder from an ID a user gave (bare or ``sweeps/SWP...``), checked: it becomes
    a path, which ``..`` would lead out of the home."""
    bare = sweep_id.removeprefix("sweeps/")
    if not re.fullmatch(rf"{ID_PREFIX}[1-9][0-9]{{18}}", bare):
        raise UserError(f"{sweep_id[:80]!r} is not a sweep ID such as SWP1234567890123456789")
    folder = sweeps_root(home) / bare
    if not (folder / "sweep.json").is_file():
        raise UserError(f"sweep {sweep_id} is not in {sweeps_root(home)}: list them with "
                        "python -m trainer sweeps list")  # fmt: skip
    return folder


@dataclass(frozen=True)
class SweepRecord:
    """``sweep.json``: what the sweep was started with, and where it stands."""

    name: str  # sweeps/<ID>
    create_time: str
    status: SweepStatus
    settings: dict[str, Any]  # the sweep group as given; runner.settings_of checks it
    rungs: tuple[int, ...]  # each rung's cumulative budget, milli-node-hours
    arguments: tuple[str, ...]  # the sweep's Hydra overrides
    fixed: tuple[str, ...]  # the overrides every trial shares
    distributions: dict[str, str]  # each searched key's Optuna distribution, as Optuna's JSON
    monitor: str
    maximize: bool
    id_prefix: str  # the task's prefix of operation and model IDs
    home: str
    cwd: str  # where the trials start, as the sweep was
    tracking_uri: str
    experiment: str
    parent_run_id: str  # the sweep's MLflow run, which its trials' runs nest under
    pid: int | None  # the sweep's process
    update_time: str | None = None  # when it ended
    cancel_requested: bool = False  # by ``sweeps cancel``

    @property
    def id(self) -> str:
        return self.name.removeprefix("sweeps/")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name, "createTime": self.create_time, "status": self.status.value,
            "settings": self.settings, "rungs": list(self.rungs),
            "arguments": list(self.arguments), "fixed": list(self.fixed),
            "distributions": self.distributions, "monitor": self.monitor,
            "maximize": self.maximize, "idPrefix": self.id_prefix, "home": self.home,
            "cwd": self.cwd, "trackingUri": self.tracking_uri, "experiment": self.experiment,
            "parentRunId": self.parent_run_id, "pid": self.pid,
        }  # fmt: skip
        if self.cancel_requested:
            data["cancelRequested"] = True
        if self.update_time is not None:
            data["updateTime"] = self.update_time
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepRecord:
        return cls(
            name=str(data["name"]), create_time=str(data["createTime"]),
            status=SweepStatus(data["status"]), settings=dict(data["settings"]),
            rungs=tuple(int(r) for r in data["rungs"]),
            arguments=tuple(data["arguments"]), fixed=tuple(data["fixed"]),
            distributions=dict(data["distributions"]), monitor=str(data["monitor"]),
            maximize=bool(data["maximize"]), id_prefix=str(data["idPrefix"]),
            home=str(data["home"]), cwd=str(data["cwd"]),
            tracking_uri=str(data["trackingUri"]), experiment=str(data["experiment"]),
            parent_run_id=str(data["parentRunId"]), pid=data.get("pid"),
            update_time=data.get("updateTime"),
            cancel_requested=bool(data.get("cancelRequested")),
        )  # fmt: skip


@dataclass(frozen=True)
class RungRecord:
    budget: int  # the cumulative budget granted for this rung
    cost: int  # the operation's cumulative cost when it ended
    value: float | None  # the monitored validation metric's best
    stop_reason: str
    global_step: int
    slot: int = 0  # the slot it ran in (a promotion takes whichever is free); 0 in older records


@dataclass
class TrialRecord:
    """``trials/<number>.json``: one trial, changed by the sweep as it runs."""

    number: int
    params: dict[str, Any]
    operation: str  # the operation's ID
    model: str  # the model's ID
    run_dir: str
    rung: int = 0  # the index of the rung it runs or last ran
    state: TrialState = TrialState.RUNNING  # the ledger's state, mirrored for the verbs
    pid: int | None = None
    slot: int = 0  # which of the sweep.parallel slots (and so which GPUs) it runs in
    results: list[RungRecord] = field(default_factory=list)
    pid_start: int | None = None  # when that process started (liveness.start_ticks)
    job_id: str | None = None  # its SLURM job, under sweep.executor=slurm or submitit_local

    def alive(self) -> bool:
        """Whether its process (or SLURM job) still runs: known by more than its pid."""
        if self.pid:
            return liveness.process_alive(self.pid, self.pid_start)
        if self.job_id:
            queued = liveness.slurm_job_queued(self.job_id)
            return queued or liveness.run_dir_held(Path(self.run_dir))
        return False

    @property
    def cost(self) -> int:
        return self.results[-1].cost if self.results else 0

    @property
    def value(self) -> float | None:
        return self.results[-1].value if self.results else None

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number, "params": self.params, "operation": self.operation,
            "model": self.model, "run_dir": self.run_dir, "rung": self.rung,
            "state": self.state.value, "pid": self.pid, "slot": self.slot,
            "results": [asdict(r) for r in self.results],
            **({"pid_start": self.pid_start} if self.pid_start is not None else {}),
            **({"job_id": self.job_id} if self.job_id else {}),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        return cls(
            number=int(data["number"]), params=dict(data["params"]),
            operation=str(data["operation"]), model=str(data["model"]),
            run_dir=str(data["run_dir"]), rung=int(data.get("rung", 0)),
            state=TrialState(data.get("state", TrialState.RUNNING.value)), pid=data.get("pid"),
            slot=int(data.get("slot", 0)),  # records written before slots had none
            results=[RungRecord(**r) for r in data.get("results", [])],
            pid_start=data.get("pid_start"), job_id=data.get("job_id"),
        )  # fmt: skip

    def save(self, folder: Path) -> None:
        write_json_atomic(folder / "trials" / f"{self.number}.json", self.to_json(), private=True)

    @classmethod
    def load(cls, path: Path) -> TrialRecord:
        return cls.from_json(json.loads(path.read_text()))


def with_credentials(recorded: str, given: str | None) -> str:
    """A URI as sweep.json keeps it (``recorded``: its credentials redacted) with the
    credentials of ``given``, the one this process was given (MLFLOW_TRACKING_URI,
    ``--tracking-uri``, ``sweep.storage=``), when both name the same place; else as recorded."""
    return given if given and redact(given) == recorded else recorded


def read_sweep(folder: Path) -> SweepRecord:
    path = folder / "sweep.json"
    try:
        return SweepRecord.from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path} is not a sweep's record: {error!r}") from None


def write_sweep(folder: Path, sweep: SweepRecord) -> None:
    write_json_atomic(folder / "sweep.json", sweep.to_json(), private=True)


def read_trials(folder: Path) -> list[TrialRecord]:
    """The trials' records, ``trials/<number>.json``; anything else there is not one of them."""
    paths = [p for p in (folder / "trials").glob("*.json") if p.stem.isdigit()]
    return [TrialRecord.load(path) for path in sorted(paths, key=lambda p: int(p.stem))]


def best_trial(trials: list[TrialRecord], maximize: bool) -> TrialRecord | None:
    """The trial with the best metric at the highest rung any trial reached with one."""
    scored = [(t, t.value) for t in trials if t.value is not None]
    if not scored:
        return None
    best, _ = max(scored, key=lambda pair: (pair[0].rung, pair[1] if maximize else -pair[1]))
    return best


@dataclass(frozen=True)
class Summary:
    """A sweep as the verbs show it: its record, the ledger's figures, its trials."""

    sweep: SweepRecord
    budget: int
    cost: int  # spent: the settled costs
    granted: int  # what the running trials may still spend
    best: TrialRecord | None
    trials: list[TrialRecord]

    def to_json(self, trials: bool = True) -> dict[str, Any]:
        data = {
            **self.sweep.to_json(),
            "budgetMilliNodeHours": str(self.budget),
            "costMilliNodeHours": str(self.cost),
            "grantedMilliNodeHours": str(self.granted),
            "bestModelId": self.best.model if self.best else "",
        }
        if trials:
            data["trials"] = [
                {**t.to_json(), "cost": t.cost, "value": t.value} for t in self.trials
            ]
        return data


def summary(folder: Path) -> Summary:
    """The sweep, its ledger figures and trials; a RUNNING sweep whose process is gone shows as
    INTERRUPTED (``sweeps resume`` goes on with it)."""
    sweep = read_sweep(folder)
    ledger = SweepLedger(folder / "ledger.json")
    trials = read_trials(folder)
    if sweep.status is SweepStatus.RUNNING and not liveness.sweep_running(folder, sweep.pid):
        sweep = replace(sweep, status=SweepStatus.INTERRUPTED)
    granted = sum(t.reserved for t in ledger.trials().values())
    return Summary(
        sweep, ledger.budget, ledger.spent(), granted, best_trial(trials, sweep.maximize), trials
    )
