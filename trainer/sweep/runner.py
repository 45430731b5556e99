"""A sweep under one total budget: Optuna asks, the ledger admits, trials train, rungs promote.

Each trial is a ``python -m trainer`` process of its own: an operation with a model, run to its
rung's budget. When a slot is free the sweep first promotes a paused trial that ranks in the
best 1/factor of its rung (``rungs.promotable``), continuing its operation from its own last
checkpoint with the next rung's budget (``resume_operation=``: same model, optimizer state and
step kept), and otherwise asks Optuna for a new trial at the first rung. Either starts only when
the ledger (``budgets/ledger.py``) admits its whole grant, so the trials' costs add up to at most
the sweep's budget, whatever ends them. Optuna is told each trial's first-rung metric, where
every trial was trained alike; later rungs are this sweep's own record. What to promote or
start, and how an ended trial is settled, is ``policy.py``'s to decide; this loop carries it out.

The sweep's process may die: its trials run in sessions of their own and go on; ``sweeps
resume`` adopts those still running, settles those that ended, and goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig, OmegaConf

from budgets.ledger import SweepLedger, TrialState
from budgets.meter import milli_node_hours
from trainer.errors import UserError
from trainer.job.ids import MODEL_ID_ENV, OPERATION_ID_ENV, PARENT_RUN_ENV
from trainer.job.settings import as_classification_type, checked_settings, read_classification_type
from trainer.settings import redact
from trainer.store.automl import recorded_details
from trainer.store.resources import new_id, utc_now
from trainer.sweep import liveness, record
from trainer.sweep.policy import Decision, Promote, Start, SweepPolicy
from trainer.sweep.record import RungRecord, SweepRecord, SweepStatus, TrialRecord
from trainer.sweep.rungs import rung_budgets
from trainer.sweep.space import SearchSpace, parse_space

if TYPE_CHECKING:
    import optuna

    from trainer.store.catalog import Catalog
    from trainer.store.store import Store

log = logging.getLogger("trainer")

POLL_SECONDS = 0.5
SAMPLERS = ("tpe", "random", "grid")
EXECUTORS = ("local", "slurm", "submitit_local")


class TrialProcess(Protocol):
    """A running trial as the sweep polls it: a child process, or a submitit job."""

    @property
    def pid(self) -> int | None: ...

    def poll(self) -> int | None: ...


@dataclass(frozen=True)
class Settings:
    budget: int
    rungs: tuple[int, ...]
    factor: int
    parallel: int
    gpus_per_trial: int
    sampler: str
    seed: int
    executor: str
    slurm: dict[str, Any]
    storage: str | None
    max_trials: int | None


def settings_of(sweep: dict[str, Any]) -> Settings:
    """The sweep group's values, checked: a bad one is one line and exit 2, before any work."""
    budget = sweep.get("budget_milli_node_hours")
    if budget is None:
        raise UserError("a sweep needs its total: sweep.budget_milli_node_hours=N")
    budget, low, high = (int(sweep[k]) for k in ("budget_milli_node_hours",
                         "min_trial_milli_node_hours", "max_trial_milli_node_hours"))  # fmt: skip
    if low < 1 or low > high:
        raise UserError(f"sweep.min_trial_milli_node_hours={low} must be at least 1 and at most "
                        f"sweep.max_trial_milli_node_hours={high}")  # fmt: skip
    if budget < low:
        raise UserError(f"sweep.budget_milli_node_hours={budget} is below one trial of the first "
                        f"rung (sweep.min_trial_milli_node_hours={low})")  # fmt: skip
    parallel = int(sweep["parallel"])
    if parallel < 1:
        raise UserError(f"sweep.parallel={parallel} must be at least 1")
    for key, allowed in (("sampler", SAMPLERS), ("executor", EXECUTORS)):
        if sweep[key] not in allowed:
            raise UserError(f"sweep.{key}={sweep[key]!r}: use one of {', '.join(allowed)}")
    factor = int(sweep["reduction_factor"])
    rungs = tuple(rung_budgets(low, factor, high, str(sweep["pruning"])))
    max_trials = sweep.get("max_trials")
    return Settings(
        budget, rungs, factor, parallel, int(sweep.get("gpus_per_trial") or 0), sweep["sampler"],
        int(sweep.get("seed") or 0), sweep["executor"], dict(sweep.get("slurm") or {}),
        sweep.get("storage"), None if max_trials is None else int(max_trials),
    )  # fmt: skip


def start_sweep(cfg: DictConfig, arguments: list[str], groups: dict[str, Any]) -> float:
    """A new sweep of ``arguments`` (Hydra overrides) on the composed config ``cfg``; run it to
    its end and return the best metric found."""
    sweep_cfg = _section(cfg, "sweep")
    settings = settings_of(sweep_cfg)
    space = parse_space(arguments, cfg, groups)
    bounds = _section(cfg, "budget")
    low, high = int(bounds["min_milli_node_hours"]), int(bounds["max_milli_node_hours"])
    if settings.rungs[0] < low or settings.rungs[-1] > high:
        raise UserError(
            f"the sweep's rungs {list(settings.rungs)} must lie within the model type's budget "
            f"bounds {low}-{high} milli-node-hours: set sweep.min_trial_milli_node_hours and "
            "sweep.max_trial_milli_node_hours, or budget.min_milli_node_hours"
        )
    task = _section(cfg, "task")
    monitor, maximize = trials_monitor(cfg)
    mlflow_cfg = _section(cfg, "mlflow")
    sweep_id = new_id(record.ID_PREFIX)
    folder = record.sweeps_root(str(cfg.home)) / sweep_id
    # Private: submitit's pickled jobs are there, which the sweep unpickles (their results).
    record.sweeps_root(str(cfg.home)).mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700)
    (folder / "trials").mkdir(mode=0o700)
    liveness.hold_sweep(folder)
    SweepLedger.create(folder / "ledger.json", settings.budget)
    tracking_uri = _absolute(str(mlflow_cfg["tracking_uri"]))
    experiment = str(mlflow_cfg["experiment_name"])
    kept = _redacted(sweep_cfg)  # what the sweep's record and run keep: no credentials
    parent_run = _parent_run(tracking_uri, experiment, sweep_id, kept)
    record.write_sweep(folder, SweepRecord(
        name=f"sweeps/{sweep_id}", create_time=utc_now(), status=SweepStatus.RUNNING,
        settings=kept, rungs=settings.rungs, arguments=tuple(map(redact, arguments)),
        fixed=tuple(o for o in space.fixed if not _names_the_store(o)),
        distributions=_distributions_json(space),
        monitor=monitor, maximize=maximize,
        id_prefix=str(task["id_prefix"]), home=str(Path(str(cfg.home)).resolve()),
        cwd=os.getcwd(), tracking_uri=redact(tracking_uri), experiment=experiment,
        parent_run_id=parent_run, pid=os.getpid(),
    ))  # fmt: skip
    print(f"sweeps/{sweep_id}", flush=True)
    log.info("sweep %s: %s milli-node-hours, rungs %s, %d at once; watch it with: "
             "python -m trainer sweeps get %s", sweep_id, settings.budget, list(settings.rungs),
             settings.parallel, sweep_id)  # fmt: skip
    return Sweep(folder, tracking_uri, settings.storage).run()


def trials_monitor(cfg: DictConfig) -> tuple[str, bool]:
    """The metric the trials' best passes are judged by, and whether more is better, as each
    trial settles it: a MULTILABEL classification's own (trainer/job/settings.py)."""
    # Hydra's own keys stay out: its sweep folder names a job number that a sweep has not.
    settings = checked_settings({str(key): _plain(cfg[key]) for key in cfg if key != "hydra"})
    found = read_classification_type(settings)
    if found is not None:
        settings = as_classification_type(settings, found)
    return settings.task.monitor, settings.task.monitor_mode == "max"


def _plain(value: Any) -> Any:
    """A config value resolved into plain Python values."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _redacted(sweep_cfg: dict[str, Any]) -> dict[str, Any]:
    storage = sweep_cfg.get("storage")
    return {**sweep_cfg, "storage": redact(storage)} if storage else sweep_cfg


def _names_the_store(override: str) -> bool:
    """Trials get the store through MLFLOW_TRACKING_URI (conf/ reads it), in their environment:
    an override of it would put its credentials on their command lines and in sweep.json."""
    return override.lstrip("+~").split("=", 1)[0] == "mlflow.tracking_uri"


def _section(cfg: DictConfig, key: str) -> dict[str, Any]:
    """One group of the composed config, resolved into plain values."""
    section = OmegaConf.to_container(cfg[key], resolve=True)
    if not isinstance(section, dict):
        raise UserError(f"{key} must be a group of keys, not {section!r}")
    return {str(k): v for k, v in section.items()}


def _absolute(tracking_uri: str) -> str:
    """A relative SQLite path names the same store for trials started in the sweep's cwd, and
    for the verbs run anywhere."""
    if tracking_uri.startswith("sqlite:///") and not tracking_uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).resolve()}"
    return tracking_uri


def _parent_run(tracking_uri: str, experiment: str, sweep_id: str, settings: dict[str, Any]) -> str:
    from trainer.store.store import Store

    store = Store(tracking_uri, experiment)
    return store.start_run(f"sweep-{sweep_id}", {"sweep_id": sweep_id}, {"sweep": settings})


def _distributions_json(space: SearchSpace) -> dict[str, str]:
    from optuna.distributions import distribution_to_json

    return {key: distribution_to_json(d) for key, d in space.distributions.items()}


class Sweep:
    """A sweep's loop over its folder's records; run again by ``sweeps resume``."""

    def __init__(self, folder: Path, tracking_uri: str | None, storage: str | None) -> None:
        """``tracking_uri`` and ``storage``: the ones this process was given, whose credentials
        the sweep's record does not keep (``record.with_credentials``)."""
        from optuna.distributions import json_to_distribution

        self.folder = folder
        self.record = record.read_sweep(folder)
        self.tracking_uri = record.with_credentials(self.record.tracking_uri, tracking_uri)
        # The trials inherit it from this process's environment (conf/ reads it there): their
        # command lines, and submitit's pickled jobs, do not carry it.
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        recorded = self.record.settings.get("storage")
        self.settings = replace(
            settings_of(self.record.settings),
            storage=record.with_credentials(recorded, storage) if recorded else None,
        )
        self.ledger = SweepLedger(folder / "ledger.json")
        self.space = SearchSpace(
            {k: json_to_distribution(v) for k, v in self.record.distributions.items()},
            list(self.record.fixed),
        )
        self.trials = {t.number: t for t in record.read_trials(folder)}
        self.processes: dict[int, TrialProcess | None] = {}
        self.study = self._study()
        self.policy = SweepPolicy(
            self.settings.rungs, self.settings.factor, self.record.maximize,
            self.settings.parallel, self._max_trials(),
        )  # fmt: skip
        self._stop_signal: str | None = None
        self._cancel_sent: set[int] = set()
        self._gave_up = False

    def _max_trials(self) -> int | None:
        """sweep.max_trials; with the grid sampler, at most the grid's size."""
        limit = self.settings.max_trials
        if self.settings.sampler == "grid":
            size = math.prod(len(v) for v in self.space.grid().values())
            limit = size if limit is None else min(limit, size)
        return limit

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> float:
        self._adopt()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                self._reap()
                if self._stopping():
                    self._cancel_running()
                elif len(self.processes) < self.settings.parallel:
                    self._fill_slots()
                if not self.processes:
                    break
                time.sleep(POLL_SECONDS)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return self._finish()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signal.Signals(signum).name
        log.warning("%s: the sweep stops its trials (their cost stays on record)",
                    self._stop_signal)  # fmt: skip

    def _stopping(self) -> bool:
        if self._stop_signal is not None:
            return True
        return record.read_sweep(self.folder).cancel_requested

    def _fill_slots(self) -> None:
        if self._failing():
            return
        while len(self.processes) < self.settings.parallel:
            trials = list(self.trials.values())
            decision = self.policy.next(trials, self.ledger.available(), len(self.study.trials))
            if decision is None or not self._carry_out(decision):
                return

    def _failing(self) -> bool:
        """The policy gave up starting trials: say why, once."""
        recent = self.policy.gave_up(list(self.trials.values()))
        if recent and not self._gave_up:
            last = recent[-1]
            lines = (self.folder / "trials" / f"{last.number}.log").read_text().splitlines()
            log.error("the last %d trials failed; the sweep starts no more. Trial %d said: %s",
                      len(recent), last.number, lines[-1] if lines else "nothing")  # fmt: skip
            self._gave_up = True
        return bool(recent)

    def _carry_out(self, decision: Decision) -> bool:
        """Start what the policy decided, once the ledger admits its grant."""
        if isinstance(decision, Promote):
            return self._promote(decision)
        return self._new_trial(decision)

    def _promote(self, promotion: Promote) -> bool:
        trial = self.trials[promotion.trial]
        if not self.ledger.admit(str(trial.number), promotion.limit):
            return False
        trial.rung, trial.state = promotion.rung, TrialState.RUNNING
        trial.slot = self._free_slot()
        log.info("trial %d promoted to rung %d (%d milli-node-hours) in slot %d",
                 trial.number, promotion.rung, promotion.limit, trial.slot)  # fmt: skip
        self._launch(trial, promotion.limit, resume=True)
        return True

    def _new_trial(self, start: Start) -> bool:
        asked = self.study.ask(self.space.distributions)
        trial = TrialRecord(
            asked.number, asked.params, new_id(self.record.id_prefix),
            new_id(self.record.id_prefix), str(self.folder / "trials" / str(asked.number)),
        )  # fmt: skip
        if not self.ledger.admit(str(trial.number), start.limit):  # only this process admits
            self.study.tell(asked.number, state=_failed())
            return False
        self.trials[trial.number] = trial
        trial.slot = self._free_slot()
        params = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        log.info("trial %d in slot %d: %s", trial.number, trial.slot, params)
        self._launch(trial, start.limit, resume=False)
        return True

    # -- trials ------------------------------------------------------------------------------

    def _launch(self, trial: TrialRecord, limit: int, resume: bool) -> None:
        budget = f"budget.train_budget_milli_node_hours={limit}"
        if resume:  # the same operation goes on from its own last checkpoint
            args = [f"resume_operation={trial.operation}", budget,
                    f"hydra.run.dir={trial.run_dir}", "hydra.output_subdir=null"]  # fmt: skip
        else:
            args = [*self.space.overrides(trial.params), budget,
                    f"display_name={self.record.id}_{trial.number}",
                    f"hydra.run.dir={trial.run_dir}"]  # fmt: skip
        # What a trial is told beyond the sweep's own environment, which it inherits (the
        # store's URI, its credentials included, is there: see __init__).
        told = {PARENT_RUN_ENV: self.record.parent_run_id, "VISION_TRAINER_HOME": self.record.home}
        if not resume:
            told.update({OPERATION_ID_ENV: trial.operation, MODEL_ID_ENV: trial.model})
        if self.settings.gpus_per_trial > 0:  # each trial on its own GPUs
            first = trial.slot * self.settings.gpus_per_trial
            told["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(first + i) for i in range(self.settings.gpus_per_trial)
            )
        command = [sys.executable, "-m", "trainer", *args]
        process = self._start(command, told, trial)
        trial.pid, trial.job_id = process.pid, getattr(process, "job_id", None)
        if trial.pid is None and self.settings.executor == "submitit_local":
            trial.pid = int(str(trial.job_id))  # its controller process, which runs the trial
        trial.pid_start = liveness.start_ticks(trial.pid) if trial.pid else None
        trial.save(self.folder)
        self.processes[trial.number] = process

    def _free_slot(self) -> int:
        """The lowest of the sweep.parallel slots that no running trial holds."""
        taken = {self.trials[n].slot for n in self.processes}
        return min(set(range(self.settings.parallel)) - taken)

    def _start(self, command: list[str], told: dict[str, str], trial: TrialRecord) -> TrialProcess:
        if self.settings.executor != "local":
            from trainer.sweep.slurm import submit

            return submit(
                command, told, self.record.cwd, self.folder / "submitit",
                f"{self.folder.name}-{trial.number}", self.settings.executor,
                self.settings.slurm, self.settings.gpus_per_trial,
            )  # fmt: skip
        with (self.folder / "trials" / f"{trial.number}.log").open("ab") as output:
            # A session of its own: the trial outlives a sweep killed or closed with its terminal.
            return subprocess.Popen(
                command, cwd=self.record.cwd, env={**os.environ, **told}, stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def _adopt(self) -> None:
        """Trials left running by an earlier process of this sweep: those on record are watched
        until they end, then settled from what their training recorded; a grant whose trial
        never got its record (that process died between the admission and the record) is
        recovered as FAILED (``orphan_cost``)."""
        on_record = {str(number) for number in self.trials}

        def cost_of(trial_id: str) -> int | None:
            if trial_id in on_record:
                return None  # watched below, and settled from its own record when it ends
            limit = self.ledger.trials()[trial_id].limit
            return orphan_cost(self.folder, trial_id, limit, self.settings.executor)

        for trial_id, cost in self.ledger.recover(cost_of).items():
            log.warning("trial %s was admitted, and the sweep's process died before its record: "
                        "settled as failed at cost %d", trial_id, cost)  # fmt: skip
            self.study.tell(int(trial_id), state=_failed(), skip_if_finished=True)
        for number in map(int, self.ledger.running()):
            if number in self.trials:
                self.processes[number] = None  # not our child: watched by its pid

    def _reap(self) -> None:
        for number, process in list(self.processes.items()):
            trial = self.trials[number]
            # Not our child (adopted after a restart of the sweep): known by its record.
            ended = not trial.alive() if process is None else process.poll() is not None
            if ended:
                del self.processes[number]
                self._ended(trial)

    def _ended(self, trial: TrialRecord) -> None:
        """Settle a trial whose process has ended, from what its training put on record."""
        limit = self.settings.rungs[trial.rung]
        result, ended = trial_outcome(Path(trial.run_dir), self.record.monitor, limit)
        result = replace(result, slot=trial.slot)
        state = self.policy.settled_state(ended, trial.rung, self._stopping())
        self.ledger.settle(str(trial.number), result.cost, state)
        trial.state, trial.pid = state, None
        trial.results = [*trial.results[: trial.rung], result]
        trial.save(self.folder)
        if trial.rung == 0:  # Optuna compares trials at the rung all of them ran
            if result.value is None:
                self.study.tell(trial.number, state=_failed(), skip_if_finished=True)
            else:
                self.study.tell(trial.number, result.value, skip_if_finished=True)
        log.info("trial %d %s at rung %d: cost %d, %s %s", trial.number, state.value,
                 trial.rung, result.cost, self.record.monitor, result.value)  # fmt: skip
        self._tag_child_run(trial)

    @cached_property
    def store(self) -> Store:
        """The sweep's MLflow store, opened once: its runs and its trials' runs."""
        from trainer.store.store import Store

        return Store(self.tracking_uri, self.record.experiment)

    @cached_property
    def catalog(self) -> Catalog:
        """The same store as the verbs read it: what ``operations cancel`` goes through."""
        from trainer.store.catalog import Catalog

        return Catalog(self.tracking_uri, self.record.experiment)

    def _cancel_running(self) -> None:
        for number in set(self.processes) - self._cancel_sent:
            try:
                self.catalog.cancel(self.trials[number].operation)
                self._cancel_sent.add(number)
            except UserError:
                pass  # not on record yet (asked again at the next poll), or ended meanwhile

    # -- the end ---------------------------------------------------------------------------

    def _finish(self) -> float:
        """Close the paused trials (pruned), put the sweep on record, draw its pictures."""
        for trial in self.trials.values():
            if trial.state is TrialState.PAUSED:
                self.ledger.close(str(trial.number), TrialState.PRUNED)
                trial.state = TrialState.PRUNED
                trial.save(self.folder)
                self._tag_child_run(trial)
        current = record.read_sweep(self.folder)
        stopped = current.cancel_requested or self._stop_signal is not None
        status = SweepStatus.CANCELLED if stopped else SweepStatus.SUCCEEDED
        record.write_sweep(self.folder, replace(current, status=status, update_time=utc_now()))
        best = record.best_trial(list(self.trials.values()), self.record.maximize)
        self._record_parent(best, status)
        spent = self.ledger.spent()
        log.info("sweep %s %s: cost %d of %d milli-node-hours; best model %s (%s %s)",
                 self.record.name, status.value, spent, self.ledger.budget,
                 best.model if best else "none", self.record.monitor,
                 best.value if best else None)  # fmt: skip
        return float(best.value) if best and best.value is not None else float("nan")

    def _record_parent(self, best: TrialRecord | None, status: SweepStatus) -> None:
        from trainer.sweep.pictures import draw

        store, run_id = self.store, self.record.parent_run_id
        tags = {"sweep_state": status.value, "costMilliNodeHours": str(self.ledger.spent()),
                "bestModelId": best.model if best else ""}  # fmt: skip
        store.set_tags(run_id, tags)
        pictures = draw(self.folder, list(self.trials.values()), self.study, self.record)
        store.log_files(run_id, pictures, "sweep")
        store.end_run(run_id, "FINISHED" if status is SweepStatus.SUCCEEDED else "KILLED")

    def _tag_child_run(self, trial: TrialRecord) -> None:
        """The trial's own MLflow run (a child of the sweep's): its searched parameters, and
        its rung, cost and state."""
        from mlflow.entities import Param

        state_file = Path(trial.run_dir) / "state.json"
        if not state_file.is_file():
            return
        run_id = json.loads(state_file.read_text())["run_id"]
        store = self.store
        store.set_tags(run_id, {"sweep_trial": str(trial.number), "sweep_rung": str(trial.rung),
                                "sweep_trial_state": trial.state.value,
                                "sweep_cost": str(trial.cost)})  # fmt: skip
        if trial.rung == 0 and trial.results:  # once: MLflow keeps a parameter's first value
            params = [Param(key, str(value)) for key, value in trial.params.items()]
            store.client.log_batch(run_id, params=params)

    def _study(self) -> optuna.Study:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = self.settings.storage or JournalStorage(
            JournalFileBackend(str(self.folder / "study.journal"))
        )
        seed = self.settings.seed
        sampler: optuna.samplers.BaseSampler
        if self.settings.sampler == "grid":
            sampler = optuna.samplers.GridSampler(self.space.grid(), seed=seed)
        elif self.settings.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed)
        return optuna.create_study(
            study_name=self.record.id, storage=storage, sampler=sampler, load_if_exists=True,
            direction="maximize" if self.record.maximize else "minimize",
        )  # fmt: skip


def trial_outcome(run_dir: Path, monitor: str, limit: int) -> tuple[RungRecord, TrialState]:
    """What a trial's training left on record when its process ended.

    A training that ended by itself wrote its cost (SUCCEEDED with its model, or FAILED,
    INTERRUPTED, CANCELLED with the seconds so far, billed by the meter's own formula). One
    killed without a word (kill -9, a lost node) is settled at its whole grant: its last
    recorded cost may be a flush behind, and the sweep's sum of costs must stay a guarantee.
    """

    def read(name: str) -> dict[str, Any]:
        try:
            data = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    state, metrics, details = read("state.json"), read("metrics.json"), recorded_details(run_dir)
    status = state.get("status", "")
    step = int(state.get("global_step") or 0)
    if status == "SUCCEEDED" and details:
        value = metrics.get(f"best_{monitor}")
        stop = details["stopReason"]
        result = RungRecord(limit, int(details["trainCostMilliNodeHours"]),
                            None if value is None else float(value), stop, step)  # fmt: skip
        converged = stop == "MODEL_CONVERGED"
        return result, TrialState.CONVERGED if converged else TrialState.PAUSED
    if status in ("FAILED", "INTERRUPTED", "CANCELLED"):
        nodes = int(((state.get("config") or {}).get("trainer") or {}).get("num_nodes", 1))
        cost = milli_node_hours(float(state.get("spent_seconds") or 0), nodes)
        ended = TrialState.CANCELLED if status == "CANCELLED" else TrialState.FAILED
        return RungRecord(limit, cost, None, status, step), ended
    if not state:  # refused before it opened an operation: nothing on record, nothing billed
        return RungRecord(limit, 0, None, "REFUSED", 0), TrialState.FAILED
    return RungRecord(limit, limit, None, "KILLED", step), TrialState.FAILED


def orphan_cost(folder: Path, trial_id: str, limit: int, executor: str) -> int:
    """The cost of a grant whose trial has no record, so no process to watch: nothing where it
    never started (a local trial's log is opened before its process starts); otherwise its
    whole grant, which its training, if it ran or runs still, cannot exceed."""
    if executor == "local" and not (folder / "trials" / f"{trial_id}.log").exists():
        return 0
    return limit


def _failed() -> optuna.trial.TrialState:
    import optuna

    return optuna.trial.TrialState.FAIL


def resume_sweep(
    home: str, sweep_id: str, budget: int | None, tracking_uri: str, storage: str | None
) -> float:
    """``sweeps resume``: the sweep goes on, with a larger total budget if given.
    ``tracking_uri``, ``storage``: this process's, with the credentials the record lacks."""
    folder = record.sweep_folder(home, sweep_id)
    current = record.read_sweep(folder)
    liveness.hold_sweep(folder)  # refused while another process runs it
    settings = current.settings
    if budget is not None:
        try:
            SweepLedger(folder / "ledger.json").raise_budget(budget)
        except ValueError as error:
            raise UserError(f"sweep.budget_milli_node_hours={budget}: {error}") from None
        settings = {**settings, "budget_milli_node_hours": budget}
    resumed = replace(current, status=SweepStatus.RUNNING, pid=os.getpid(),
                      cancel_requested=False, settings=settings)  # fmt: skip
    record.write_sweep(folder, resumed)
    return Sweep(folder, tracking_uri, storage).run()
