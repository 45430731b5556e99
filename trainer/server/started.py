"""The operations this server started, answered for until the store has them.

A training, an import, a batch prediction or an export runs as a process of its own, which puts
its operation on record once it has loaded what it needs (seconds, for torch). Until then, and
for the operations that end at once (a model's deletion), the server keeps the Operation in
``<home>/serve/operations/<ID>.json`` with the process that works on it: a restarted server
still answers for them, and one whose process died before recording anything ends failed with
the last error its log shows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.store.automl import RpcCode, resource_id
from trainer.store.resources import utc_now, write_json_atomic
from trainer.sweep.liveness import process_alive, start_ticks

LOG_LINES = 40  # of a dead process's log, read for its last error


@dataclass
class Started:
    """One operation this server started: its resource as first written, the process working on
    it (none for one that ended at once), its log, and a cancel asked for before it was on
    record."""

    operation: dict[str, Any]
    pid: int = 0
    pid_start: int | None = None
    log: str = ""
    cancel_requested: bool = False

    @property
    def operation_id(self) -> str:
        return resource_id(self.operation["name"])

    def current(self) -> dict[str, Any]:
        """The operation now: as written while its process lives (or it ended at once), failed
        with its log's last error once the process is gone without putting it on record."""
        if self.operation.get("done") or process_alive(self.pid, self.pid_start):
            return self.operation
        ended = {**self.operation, "done": True}
        ended["metadata"] = {**self.operation["metadata"], "updateTime": utc_now()}
        ended["error"] = {"code": int(RpcCode.INTERNAL), "message": self._last_error()}
        return ended

    def _last_error(self) -> str:
        try:
            lines = Path(self.log).read_text(errors="replace").splitlines()[-LOG_LINES:]
        except OSError:
            lines = []
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        last = errors[-1] if errors else "the process ended before it recorded the operation"
        return f"{last.strip()[:500]} (log: {self.log})"


class StartedOperations:
    """The folder of the operations this server started, one JSON file each (0600: an
    operation's metadata may name paths)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)

    def add(self, operation: dict[str, Any], pid: int = 0, log: str = "") -> Started:
        started = Started(operation, pid, start_ticks(pid) if pid else None, log)
        self.save(started)
        return started

    def save(self, started: Started) -> None:
        write_json_atomic(self._path(started.operation_id), vars(started), private=True)

    def get(self, operation_id: str) -> Started | None:
        try:
            found = json.loads(self._path(operation_id).read_text())
            return Started(**found)
        except (OSError, ValueError, TypeError):
            return None

    def all(self) -> list[Started]:
        found = (self.get(path.stem) for path in self.folder.glob("*.json"))
        return [started for started in found if started is not None]

    def forget(self, operation_id: str) -> None:
        self._path(operation_id).unlink(missing_ok=True)

    def _path(self, operation_id: str) -> Path:
        if not operation_id.isalnum():  # an ID from a request names a file here
            return self.folder / "-"
        return self.folder / f"{operation_id}.json"
