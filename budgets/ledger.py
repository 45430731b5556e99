"""The sweep's budget ledger: admission control over one total budget, shared through a file.

Why a ledger and not a timer: a timer can only stop *starting* trials (Optuna's
``optimize(timeout=)``, which then overruns by up to one whole trial per worker) or kill the
running ones (Ray Tune's ``time_budget_s``, which loses their last metrics). Each training of this
project already keeps its cost within the budget it is granted, so a sweep can give a real
guarantee by handing out grants and never granting more than is left:

    sum(cost of every trial) + sum(limit - cost of every RUNNING trial) <= budget

A trial, or the promotion of a paused trial to a larger rung, is admitted only when its whole
extra need fits in what is left; when its training ends, for any reason, the unspent part of its
grant returns to the pool. Pruned, converged and crashed trials keep their cost on record.

The ledger is one JSON file. Every change is made under an exclusive ``fcntl.flock`` on a sibling
lock file and written atomically (temporary file, fsync, ``os.replace``), so several processes on
one machine may share it, and a crash of any of them, the sweep's included, loses no completed
change and never leaves a half-written file. Readers take no lock: ``os.replace`` swaps whole
files. flock is not reliable on every network file system: across machines, let one process (the
sweep) make the changes, as it does when its trials run through SLURM.

Standard library only: ``budgets`` never imports torchvision, MLflow or ``trainer``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1  # bumped when the file's layout changes, so an old reader refuses a new file


class TrialState(str, Enum):
    RUNNING = "RUNNING"  # holds a grant: limit - cost stays reserved for it
    PAUSED = "PAUSED"  # settled at the end of a rung; may be promoted to a larger limit
    DONE = "DONE"  # trained to its last rung
    CONVERGED = "CONVERGED"  # stopped itself early (MODEL_CONVERGED)
    PRUNED = "PRUNED"  # not promoted
    FAILED = "FAILED"  # crashed or killed
    CANCELLED = "CANCELLED"  # stopped by the user


SETTLED = frozenset(TrialState) - {TrialState.RUNNING}
FINAL = SETTLED - {TrialState.PAUSED}


@dataclass(frozen=True)
class TrialRecord:
    limit: int  # the cumulative budget its training is allowed: its current rung's
    cost: int  # settled cost so far, cumulative over its rungs
    state: TrialState
    # The largest excess of cost over limit at a settle. The trainer keeps cost <= grant, so a
    # non-zero value is a bug elsewhere: kept on record, never hidden.
    overrun: int = 0

    @property
    def reserved(self) -> int:
        """What the trial may still spend: its unspent grant while running, else nothing."""
        return self.limit - self.cost if self.state is TrialState.RUNNING else 0


@dataclass
class _Book:
    """The file's content in memory; changed only under the lock."""

    budget: int
    trials: dict[str, TrialRecord] = field(default_factory=dict)

    def committed(self) -> int:
        return sum(t.cost + t.reserved for t in self.trials.values())

    def available(self) -> int:
        # Negative only after an overrun: admissions then stop until the budget is raised.
        return self.budget - self.committed()

    def trial(self, trial_id: str) -> TrialRecord:
        if trial_id not in self.trials:
            raise ValueError(f"trial {trial_id!r} is not in the ledger")
        return self.trials[trial_id]

    def settle(self, trial_id: str, cost: int, state: TrialState) -> TrialRecord:
        trial = self.trial(trial_id)
        if trial.state is not TrialState.RUNNING:
            raise ValueError(f"trial {trial_id!r} is {trial.state.value}, not RUNNING: not settled")
        if cost < trial.cost:
            # Cost is cumulative: what its earlier rungs spent cannot be unspent.
            raise ValueError(
                f"cost {cost} of trial {trial_id!r} is below its cost of earlier rungs, "
                f"{trial.cost}; give the cumulative cost"
            )
        overrun = max(trial.overrun, cost - trial.limit)
        if cost > trial.limit:
            log.error(
                "trial %r cost %d milli-node-hours, above its grant of %d: recorded as it is",
                trial_id,
                cost,
                trial.limit,
            )
        record = TrialRecord(trial.limit, cost, state, overrun)
        self.trials[trial_id] = record
        return record

    def to_json(self) -> str:
        trials = {
            trial_id: {
                "limit": t.limit,
                "cost": t.cost,
                "state": t.state.value,
                "overrun": t.overrun,
            }
            for trial_id, t in self.trials.items()
        }
        book = {"format": FORMAT, "budget_milli_node_hours": self.budget, "trials": trials}
        return json.dumps(book, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> _Book:
        try:
            data = json.loads(text)
            if data["format"] != FORMAT:
                raise ValueError(f"format {data['format']!r}, this reader knows {FORMAT}")
            trials = {
                str(trial_id): TrialRecord(
                    _count("limit", t["limit"], minimum=1),
                    _count("cost", t["cost"], minimum=0),
                    TrialState(t["state"]),
                    _count("overrun", t["overrun"], minimum=0),
                )  # fmt: skip
                for trial_id, t in data["trials"].items()
            }
            # Figures read back are checked as given ones are: the file may have been changed
            # (JSON's parser takes Infinity and NaN, and a negative cost bends every sum).
            budget = _count("budget_milli_node_hours", data["budget_milli_node_hours"], minimum=1)
            return cls(budget, trials)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path} is not a sweep ledger: {error}") from error


class SweepLedger:
    """A sweep's total budget and its trials' grants, in one file that processes may share.

    Every method reads the file afresh: another process may have changed it since.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = _lock_path(self.path)
        self._read()  # a missing or foreign file fails here, not at the first admission

    @classmethod
    def create(cls, path: Path, budget_milli_node_hours: int) -> SweepLedger:
        """A new, empty ledger; refuses to overwrite an existing one (that is a resume)."""
        budget = _count("budget_milli_node_hours", budget_milli_node_hours, minimum=1)
        path = Path(path)
        # Under the lock, so that of two processes creating the same ledger one wins, one fails.
        with _locked(_lock_path(path)):
            if path.exists():
                raise FileExistsError(f"{path} exists: open it with SweepLedger(path) to resume")
            _write_atomically(path, _Book(budget).to_json())
        return cls(path)

    # Reading

    @property
    def budget(self) -> int:
        return self._read().budget

    def trials(self) -> dict[str, TrialRecord]:
        """A snapshot of every trial, in admission order."""
        return dict(self._read().trials)

    def running(self) -> list[str]:
        return [i for i, t in self._read().trials.items() if t.state is TrialState.RUNNING]

    def spent(self) -> int:
        """The settled costs of all trials."""
        return sum(t.cost for t in self._read().trials.values())

    def available(self) -> int:
        """The budget less what is spent and what running trials may still spend."""
        return self._read().available()

    # Changing

    def admit(self, trial_id: str, limit: int) -> bool:
        """Grant a new trial ``limit``, or promote a PAUSED one to the cumulative ``limit``.

        Admitted only when the whole extra need (``limit`` less what the trial already spent)
        fits in ``available()``; otherwise returns False and changes nothing.
        """
        _check_id(trial_id)
        limit = _count("limit", limit, minimum=1)
        with self._change() as book:
            trial = book.trials.get(trial_id)
            if trial is not None and trial.state is not TrialState.PAUSED:
                raise ValueError(
                    f"trial {trial_id!r} is {trial.state.value}: only a PAUSED trial is promoted"
                )
            cost, overrun = (0, 0) if trial is None else (trial.cost, trial.overrun)
            if limit <= cost:
                raise ValueError(
                    f"limit {limit} of trial {trial_id!r} is not above its cost so far, {cost}"
                )
            if limit - cost > book.available():
                return False
            book.trials[trial_id] = TrialRecord(limit, cost, TrialState.RUNNING, overrun)
            return True

    def settle(self, trial_id: str, cost: int, state: TrialState | str) -> TrialRecord:
        """A RUNNING trial's training ended, for any reason, having spent ``cost`` in all.

        What it did not spend of its grant returns to the pool. Use PAUSED for the end of a rung
        the trial may be promoted from.
        """
        cost = _count("cost", cost, minimum=0)
        state = _settled_state(state, SETTLED)
        with self._change() as book:
            return book.settle(trial_id, cost, state)

    def close(self, trial_id: str, state: TrialState | str) -> TrialRecord:
        """A PAUSED trial will not be promoted: it becomes PRUNED, DONE or another final state."""
        state = _settled_state(state, FINAL)
        with self._change() as book:
            trial = book.trial(trial_id)
            if trial.state is not TrialState.PAUSED:
                raise ValueError(f"trial {trial_id!r} is {trial.state.value}, not PAUSED")
            record = TrialRecord(trial.limit, trial.cost, state, trial.overrun)
            book.trials[trial_id] = record
            return record

    def raise_budget(self, new_total: int) -> None:
        """Set a new total (a resume with more budget); never below what is spent and granted."""
        new_total = _count("new_total", new_total, minimum=1)
        with self._change() as book:
            if new_total < book.committed():
                raise ValueError(
                    f"budget {new_total} is below the {book.committed()} milli-node-hours "
                    "already spent or granted"
                )
            book.budget = new_total

    def recover(self, actual_cost: Callable[[str], int | None]) -> dict[str, int]:
        """After a restart of the sweep, settle as FAILED the RUNNING trials whose training died.

        ``actual_cost(trial_id)`` returns the trial's cumulative cost as its training recorded
        it, or None to leave the trial RUNNING: its training still runs, or the caller will
        settle it from a fuller record (the sweep's resume does so for every trial it has a
        record of, and recovers here the grants it has none for). When the cost cannot be read,
        returning the trial's limit is safe: no training spends more than its grant. Returns
        the settled trials and their costs.
        """
        # Costs are read outside the lock: the callback may be slow, or read this ledger itself
        # (flock would then deadlock against our own process).
        costs = {trial_id: actual_cost(trial_id) for trial_id in self.running()}
        settled: dict[str, int] = {}
        with self._change() as book:
            for trial_id, cost in costs.items():
                if cost is None or book.trials[trial_id].state is not TrialState.RUNNING:
                    continue  # still running, or settled meanwhile by another process
                cost = _count("cost", cost, minimum=0)
                # A record that lacks the crashed piece cannot unspend the earlier rungs.
                cost = max(cost, book.trials[trial_id].cost)
                settled[trial_id] = book.settle(trial_id, cost, TrialState.FAILED).cost
        return settled

    # The file

    def _read(self) -> _Book:
        return _Book.from_json(self.path.read_text(), self.path)

    @contextlib.contextmanager
    def _change(self) -> Iterator[_Book]:
        """Read, change and write back under the lock; nothing is written if the change raises."""
        with _locked(self._lock_path):
            book = self._read()
            before = book.to_json()
            yield book
            after = book.to_json()
            if after != before:  # a refused admission writes nothing (and costs no fsync)
                _write_atomically(self.path, after)


def _lock_path(path: Path) -> Path:
    # A separate lock file: the ledger itself is replaced on every write, and a lock on a
    # replaced inode would not exclude a process that opened the new one.
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # Never through a symbolic link (a link planted beside the ledger would have us create
    # or lock what it points at).
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; the kernel does the same for a killed process


def _write_atomically(path: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # the content is on disk before the name points at it
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename itself survives a power cut only once the directory is synced.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _count(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass, and a float cost would drift: milli-node-hours are whole numbers.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} is not a whole number of milli-node-hours")
    if value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}")
    return value


def _check_id(trial_id: object) -> None:
    if not isinstance(trial_id, str) or not trial_id:
        raise ValueError(f"trial id {trial_id!r} is not a non-empty string")


def _settled_state(state: TrialState | str, allowed: frozenset[TrialState]) -> TrialState:
    try:
        state = TrialState(state)
    except ValueError:
        raise ValueError(f"unknown trial state {state!r}") from None
    if state not in allowed:
        names = ", ".join(sorted(s.value for s in allowed))
        raise ValueError(f"state {state.value} is not one of {names}")
    return state
