"""``state.json``: what a run directory needs to continue an interrupted operation.

It holds the resolved config, the IDs, the labels, the status and the cost spent so far, and is
rewritten atomically at least every ``checkpoint.cost_flush_seconds``, so that after a kill -9
the cost on record is at most that old.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.store.automl import is_resource_name, resource_id
from trainer.store.resources import (
    check_id,
    check_name,
    open_lock,
    parse_time,
    utc_now,
    write_json_atomic,
)

RUNNING, INTERRUPTED, SUCCEEDED, FAILED = "RUNNING", "INTERRUPTED", "SUCCEEDED", "FAILED"
CANCELLED = "CANCELLED"
STATUSES = (RUNNING, INTERRUPTED, SUCCEEDED, FAILED, CANCELLED)
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_seconds(value: Any, what: str) -> float:
    """A duration read back: a finite number >= 0 (NaN, infinities and negatives would let a
    training never stop on budget)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} {value!r} is not a number")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} {value!r} is not a finite number >= 0")
    return float(value)


@dataclass
class RunState:
    operation: str
    model_id: str
    run_id: str
    config: dict[str, Any]
    create_time: str
    labels: list[str] = field(default_factory=list)
    base_model_id: str = ""
    status: str = RUNNING
    spent_seconds: float = 0.0
    global_step: int = 0
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    updated: str = field(default_factory=utc_now)
    phase: str = ""  # what the operation is doing: checking the dataset, training, testing ...
    piece_started: float = 0.0  # UNIX time this piece of the operation started billing
    pretrained_weights: str = ""  # torchvision's name of the weights the model started from

    def save(self, run_dir: Path) -> None:
        self.updated = utc_now()
        write_json_atomic(run_dir / "state.json", asdict(self), private=True)

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        """The state as a run directory holds it, every field checked: a resumed operation
        trusts its cost and IDs, so a damaged or edited file must not pass for one."""
        path = run_dir / "state.json"
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            state = cls(**data)
            state._check()
        except (OSError, ValueError, TypeError) as error:
            raise UserError(
                f"cannot read {path} ({error}); the operation cannot be resumed"
            ) from None
        return state

    def _check(self) -> None:
        if not is_resource_name(self.operation, "operations"):
            raise ValueError(f"operation {self.operation[:80]!r} is not an operation's name")
        check_id(resource_id(self.operation), "operation")
        check_id(self.model_id, "model_id")
        if self.base_model_id:
            check_id(self.base_model_id, "base_model_id")
        if not isinstance(self.run_id, str) or not RUN_ID.match(self.run_id):
            raise ValueError(f"run_id {self.run_id!r} is not an MLflow run ID")
        if not isinstance(self.config, dict) or not isinstance(self.labels, list):
            raise ValueError("config must be an object and labels a list")
        for label in self.labels:
            check_name("label", label)
        self.spent_seconds = checked_seconds(self.spent_seconds, "spent_seconds")
        if not _whole(self.global_step) or self.global_step < 0 or not _whole(self.pid):
            raise ValueError("global_step and pid must be whole numbers, global_step >= 0")
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {', '.join(STATUSES)}")
        try:  # recorded at the end of the training: a bad one would fail it, its budget spent
            parse_time(self.create_time, "create_time")
        except UserError as error:
            raise ValueError(str(error)) from None
        self.piece_started = checked_seconds(self.piece_started, "piece_started")
        texts = (self.phase, self.host, self.pretrained_weights)
        if not all(isinstance(text, str) for text in texts):
            raise ValueError("phase, host and pretrained_weights must be text")

    def at_least(self, spent_on_record: Any) -> None:
        """Bill at least the cost the store has on record for the operation: a state file
        edited, or restored from an older copy, must not give back budget already spent."""
        try:
            on_record = checked_seconds(float(spent_on_record), "the store's spent_seconds")
        except (TypeError, ValueError):
            return  # none on record (an older operation), or unreadable: the file's value stands
        self.spent_seconds = max(self.spent_seconds, on_record)

    def still_running(self) -> bool:
        """True when the process that wrote this state is alive on this host."""
        if self.status != RUNNING or self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.pid != os.getpid()


_HELD: dict[Path, Any] = {}  # the run directories this process holds, and their open lock files


def hold_run_dir(run_dir: Path) -> None:
    """Hold an exclusive lock on ``run_dir`` for the life of this process: one process per
    operation, so that two resumes of one interrupted operation cannot both add to its cost.
    The lock goes with the process, however it ends (kill -9 included)."""
    run_dir = run_dir.resolve()
    if run_dir in _HELD:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = os.fdopen(open_lock(run_dir / ".lock"), "r+")  # held open until the process ends
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            f"{run_dir} is in use by {holder}: one process at a time works on an operation; "
            "wait for it to end or cancel it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _HELD[run_dir] = handle


def release_run_dir(run_dir: Path) -> None:
    """Let another process take ``run_dir``: the background process of a detached resume."""
    handle = _HELD.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()  # closing the file drops its flock
