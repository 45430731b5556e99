"""An operation's life on record, the same for a training, a prediction, an export and an
evaluation: its MLflow run opened, the operation published RUNNING, and, whatever happens in
between, its end published with a google.rpc code and the run ended.

A failure to record the end (a full disk, a store that is down) is logged, never raised in
place of the error that ended the operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError
from trainer.settings import redact
from trainer.store.automl import Operation, RpcCode

log = logging.getLogger("trainer")

FAILED, KILLED = "FAILED", "KILLED"  # MLflow's run statuses for an operation that did not succeed


@dataclass(frozen=True)
class Ending:
    """How an operation ended when it did not succeed: its state (FAILED, CANCELLED, ...), the
    google.rpc code and message of its ``error``."""

    state: str
    code: RpcCode
    message: str


def failed(error: BaseException) -> Ending:
    """A user's mistake is INVALID_ARGUMENT, anything else INTERNAL."""
    code = RpcCode.INVALID_ARGUMENT if isinstance(error, UserError) else RpcCode.INTERNAL
    return Ending("FAILED", code, redact(str(error)))


@dataclass
class OperationRun:
    """An operation and the MLflow run that holds it."""

    store: Any
    run_id: str
    operation: Operation | None

    def publish(self, state: str = "RUNNING") -> None:
        if self.operation is not None:
            self.store.publish_operation(self.run_id, self.operation.resource, state)


def record_end(run: OperationRun, ending: Ending, tags: dict[str, str] | None = None) -> None:
    """The operation failed with ``ending``'s code, published, ``tags`` set, the run ended."""
    try:
        if run.operation is not None:
            run.operation.fail(ending.code, ending.message)
        run.publish(ending.state)
        if tags:
            run.store.set_tags(run.run_id, tags)
        run.store.end_run(run.run_id, FAILED if ending.state == "FAILED" else KILLED)
    except Exception as failure:
        unrecorded(ending.state, failure)


def unrecorded(state: str, failure: Exception) -> None:
    """Say that an operation's end could not be recorded (the error that ended it goes on)."""
    log.error("could not record that the operation ended %s: %s: %s", state,
              type(failure).__name__, redact(str(failure)))  # fmt: skip


@contextmanager
def operation_on_record(
    store: Any, run_name: str, tags: dict[str, str], params: dict[str, Any],
    operation: Operation | None = None, ending: Callable[[BaseException], Ending] = failed,
) -> Iterator[OperationRun]:  # fmt: skip
    """A run for ``operation`` (an evaluation has none: AutoML's is no long-running operation),
    published RUNNING; ended FAILED (``ending`` says how) on an exception, which goes on, or
    SUCCEEDED when the block succeeded the operation."""
    if operation is not None:
        tags = {"operation": operation.name, **tags}
    # What the run keeps of the call's arguments: a tracking URI among them, redacted.
    shown = {
        key: redact(value) if isinstance(value, str) else value for key, value in params.items()
    }
    run = OperationRun(store, store.start_run(run_name, tags, shown), operation)
    run.publish("RUNNING")
    try:
        yield run
    except BaseException as error:
        record_end(run, ending(error))
        raise
    run.publish("SUCCEEDED")
    store.end_run(run.run_id)
