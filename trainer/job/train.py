"""One budgeted training as an operation: checked, billed, opened, trained, ended on record.

The budget meter starts once the settings have been checked; everything after that, data setup,
training, validation, the final TEST evaluation and the recording of the model, is billed. A
resumed operation carries the seconds its earlier pieces spent, so the invariant cost <= budget
holds for the whole operation. The training itself reads as its phases (trainer/job/phases.py).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from budgets import BudgetMeter
from budgets.meter import milli_node_hours
from trainer.errors import UserError
from trainer.job import slurm
from trainer.job.checkpoints import StopRequest, TrainingInterrupted
from trainer.job.continuation import StartFrom
from trainer.job.cost_record import CostFlusher, CostRecord
from trainer.job.ids import MODEL_ID_ENV, OPERATION_ID_ENV, PARENT_RUN_ENV
from trainer.job.job import Job
from trainer.job.run_state import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    RunState,
    hold_run_dir,
)
from trainer.job.settings import parent
from trainer.job.work_history import WorkHistory, save_reserves
from trainer.settings import Settings, redact
from trainer.store.automl import Operation, RpcCode, resource_id
from trainer.store.lifecycle import Ending, OperationRun, record_end, unrecorded
from trainer.store.resources import new_id, utc_now
from trainer.store.store import Store
from trainer.tasks import task_of
from trainer.tasks.pretrained import choose

log = logging.getLogger("trainer")
# Lightning sets its loggers to INFO on import and adds tips; keep stderr for our own progress.
for _noisy in ("lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch.*")


def run_training(
    settings: Settings, run_dir: Path, start: StartFrom | None = None,
    on_open: Callable[[str, Path], None] | None = None,
) -> float:  # fmt: skip
    """Train one model as ``settings`` say; return its best validation metric (for sweepers).
    ``on_open`` hears the operation's name and run directory once it is on record."""
    start = start or StartFrom()
    meter = _checked_meter(settings, start)
    hold_run_dir(run_dir)  # one process per operation: a second resume is refused
    _import_what_the_store_uses()  # importing code is not the operation's work
    if settings.dataset.path:
        # A dataset that cannot train is refused in one line before any operation is opened
        # or billed, as a bad setting is: its listing tells (labels, splits), without decoding
        # a file.
        task_of(settings).read_manifest(settings, check_files=False)
    # Creating a tracking database that does not exist yet (1 s, MLflow's schema migrations)
    # is the store's set-up, done once for every operation to come, not this one's work.
    store = Store(settings.mlflow.tracking_uri.reveal(), settings.mlflow.experiment_name)
    meter.start()  # from here on, everything is the operation's work and billed
    started_at, opened = time.time(), time.monotonic()
    operation, state = _open_operation(settings, start, store, run_dir)
    state.piece_started = started_at
    record = CostRecord(meter, state, operation, store, run_dir)
    job = Job(settings, start, record, StopRequest(), run_dir, _phase_started=opened)
    verb = "resumed" if start.state else "started"
    log.info("operation %s %s for %s in %s", operation.name, verb, job.model_name, run_dir)
    job.stop.install()
    job.flush()
    if on_open is not None:
        on_open(operation.name, run_dir)
    try:
        with CostFlusher(record, settings.checkpoint.cost_flush_seconds):
            from trainer.job.phases import train  # Lightning: once the operation is open

            return train(job)
    except TrainingInterrupted as interruption:
        _interrupted(job, interruption)
    except BaseException as error:
        # A training's own mistakes (a dataset that cannot train, a budget spent on set-up)
        # end UNKNOWN, as they always have; anything else is INTERNAL.
        code = RpcCode.UNKNOWN if isinstance(error, UserError) else RpcCode.INTERNAL
        _end_unfinished(job, FAILED, code, redact(f"{type(error).__name__}: {error}"))
        raise
    finally:
        # After a stop request the process is on its way out: keep the handler, so that a
        # second Ctrl-C during the clean-up still exits at once with 130.
        if job.stop.reason is None:
            job.stop.restore()


def _checked_meter(settings: Settings, start: StartFrom) -> BudgetMeter:
    """The operation's meter, once what can be refused before any work is billed was."""
    budget, nodes = settings.budget.train_budget_milli_node_hours, settings.trainer.num_nodes
    spent_before = start.state.spent_seconds if start.state else 0.0
    meter = BudgetMeter(budget, nodes, spent_before_seconds=spent_before)
    if meter.remaining_seconds() <= 0:
        raise UserError(
            f"the operation has spent {meter.cost_milli_node_hours()} of {budget} "
            "milli-node-hours; resume it with a larger budget.train_budget_milli_node_hours"
        )
    _refuse_a_budget_below_the_reserves(settings, meter)
    if not start.state and not start.base_model_id and settings.model.pretrained == "true":
        # Without the weights: refused naming the command that gets them (``auto`` says so
        # later, in one line, and goes on).
        weights = task_of(settings).pretrained_weights(settings.model)
        choose("true", weights, settings, check_hash=False)
    return meter


def _interrupted(job: Job, interruption: TrainingInterrupted) -> NoReturn:
    """A cancel or a signal: the checkpoint and cost are saved; say how to go on, and exit."""
    job.state.global_step = interruption.global_step
    if interruption.cancelled:
        _end_unfinished(job, CANCELLED, RpcCode.CANCELLED, str(interruption))
        print(f"error: {interruption}; checkpoint and cost saved", file=sys.stderr)
    else:
        hint = f"python -m trainer resume_operation={resource_id(job.operation.name)}"
        _end_unfinished(job, INTERRUPTED, RpcCode.ABORTED, f"{interruption}; continue with {hint}")
        print(f"error: {interruption}; checkpoint and cost saved; continue with {hint}",
              file=sys.stderr, flush=True)  # fmt: skip
        if interruption.reason == slurm.REQUEUE_SIGNAL:  # the job's time limit is near
            slurm.requeue()
    raise SystemExit(interruption.exit_code) from None


def _import_what_the_store_uses() -> None:
    """Import the modules MLflow loads on first use, before the meter starts, as every other
    import is: its SQL store took 1.3 s of a training's set-up on 2 cores, its model flavour
    and torch.export 0.6 s of its recording; Lightning and the phases too."""
    import mlflow.pytorch  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch.export  # noqa: F401

    import trainer.job.phases  # noqa: F401


def _open_operation(
    settings: Settings, start: StartFrom, store: Store, run_dir: Path
) -> tuple[Operation, RunState]:
    saved = settings.to_dict()  # files and the store keep the tracking URI redacted
    if start.state is not None:  # the same operation, model ID and MLflow run, going on
        state = start.state
        state.status, state.config = RUNNING, saved
        state.pid, state.host = os.getpid(), socket.gethostname()  # this process now
        store.reopen_run(state.run_id)
        api = settings.task.automl_api
        return Operation.reopen(run_dir / "operation.json", state.operation, api), state
    task = settings.task
    operation_id = os.environ.pop(OPERATION_ID_ENV, None) or new_id(task.id_prefix)
    path = run_dir / "operation.json"
    operation = Operation(operation_id, path, parent=parent(settings), api=task.automl_api)
    model_id = os.environ.pop(MODEL_ID_ENV, None) or new_id(task.id_prefix)
    tags = {
        "operation": operation.name,
        "model_id": model_id,
        "base_model_id": start.base_model_id,
        "task": task.name,
        "run_dir": str(run_dir.resolve()),
    }
    parent_run = os.environ.pop(PARENT_RUN_ENV, None)
    if parent_run:  # a sweep's trial: its run is a child of the sweep's (MLflow's own tag)
        tags["mlflow.parentRunId"] = parent_run
    run_id = store.start_run(settings.display_name, tags, saved)
    state = RunState(
        operation.name, model_id, run_id, saved, utc_now(), base_model_id=start.base_model_id
    )
    return operation, state


def _end_unfinished(job: Job, status: str, code: RpcCode, message: str) -> None:
    """Record how the operation ended, its cost on record first (a resume reads it). If that
    fails too (a full disk, the store down), the original error still stands: this one is
    logged, not raised in its place."""
    cost = job.meter.cost_milli_node_hours()
    ending = Ending(status, code, f"{message} (cost so far {cost} milli-node-hours)")
    try:
        job.state.status = status
        job.operation.fail(ending.code, ending.message)
        job.flush()
    except Exception as failure:
        unrecorded(status, failure)
        return
    # The operation is on record as failed (flush published it): its run's tags and status.
    run = OperationRun(job.store, job.state.run_id, operation=None)
    record_end(run, ending, {"trainCostMilliNodeHours": str(cost), "state": status})


def _refuse_a_budget_below_the_reserves(settings: Settings, meter: BudgetMeter) -> None:
    """A budget that cannot even keep the reserves for recording the model and for checkpoints
    is refused before any work is billed, naming a budget above them."""
    history = WorkHistory(settings.home, f"{settings.task.name}/{settings.model.type}")
    reserves = save_reserves(settings.budget, history)
    kept = reserves.recording + reserves.checkpoint
    if meter.remaining_seconds() > kept:
        return
    # What the reserves cost, after what an interrupted operation has spent already.
    reserved = milli_node_hours(meter.elapsed_seconds() + kept, settings.trainer.num_nodes)
    raise UserError(
        f"budget.train_budget_milli_node_hours={meter.budget_milli_node_hours} is too small: "
        f"{reserves.recording:.1f} s are kept for recording the model and "
        f"{reserves.checkpoint:.1f} s for checkpoints (budget.save_reserve_seconds), which "
        f"leaves no time to train; use more than {reserved}"
    )
