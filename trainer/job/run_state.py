"""``state.json``: what a run directory needs to continue an interrupted operation.

It holds the resolved config, the IDs, the labels, the status and the cost spent so far, and is
rewritten atomically at least every ``checkpoint.cost_flush_seconds``, so that after a kill -9
the cost on record is at most that old.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.store.resources import utc_now, write_json_atomic

RUNNING, INTERRUPTED, SUCCEEDED, FAILED = "RUNNING", "INTERRUPTED", "SUCCEEDED", "FAILED"
CANCELLED = "CANCELLED"


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

    def save(self, run_dir: Path) -> None:
        self.updated = utc_now()
        write_json_atomic(run_dir / "state.json", asdict(self))

    @classmethod
    def load(cls, run_dir: Path) -> RunState:
        path = run_dir / "state.json"
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise UserError(
                f"cannot read {path} ({error}); the operation cannot be resumed"
            ) from None

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
