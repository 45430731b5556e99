"""One budgeted training, top to bottom: check, measure, train, evaluate, record.

The budget meter starts once the config has been checked; everything after that, data setup,
training, validation, the final TEST evaluation and the recording of the model, is billed. A
resumed operation carries the seconds its earlier pieces spent, so the invariant cost <= budget
holds for the whole operation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from budgets import BudgetMeter
from budgets.meter import milli_node_hours
from trainer.data.device_augment import resolve_precision
from trainer.data.input_size import auto_input_size, checked_size, is_auto
from trainer.data.manifest import CheckStopped
from trainer.errors import UserError
from trainer.job import slurm
from trainer.job.checkpoints import (
    AtomicCheckpointIO,
    StopRequest,
    TrainingInterrupted,
    load_first_good,
)
from trainer.job.continuation import StartFrom
from trainer.job.distributed import tester, write_brief
from trainer.job.fitting import Leader, fit_parts
from trainer.job.ids import MODEL_ID_ENV, OPERATION_ID_ENV, PARENT_RUN_ENV
from trainer.job.run_state import (
    CANCELLED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    SUCCEEDED,
    RunState,
    hold_run_dir,
)
from trainer.job.settings import validate
from trainer.job.work_history import WorkHistory, save_reserves
from trainer.store.automl import (
    Operation,
    Parent,
    add_months,
    model_details,
    model_metadata,
    model_resource,
    resource_id,
)
from trainer.store.evaluations import record_evaluation
from trainer.store.resources import (
    file_sha256,
    new_id,
    redact,
    redacted_config,
    utc_now,
    write_json_atomic,
)
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

MODEL_CONVERGED = "MODEL_CONVERGED"
BUDGET_REACHED = "BUDGET_REACHED"
CANCELLED_CODE, ABORTED, INTERNAL = 1, 10, 13  # google.rpc.Code
# What a training does before its first step, in order (Job.enter names them).
SETUP_PHASES = (
    "opening the operation", "checking the dataset", "preparing data", "building the network",
)  # fmt: skip


@dataclass
class Job:
    """What one training works with, from its checked config to its store."""

    cfg: dict[str, Any]
    budget: int
    nodes: int
    meter: BudgetMeter
    start: StartFrom
    state: RunState
    operation: Operation
    store: Store
    stop: StopRequest
    run_dir: Path
    # Seconds of each set-up phase (metrics.json's setupSeconds): what every training pays
    # before its first step, and a sweep pays once per trial.
    setup_seconds: dict[str, float] = field(default_factory=dict)
    _phase_started: float = field(default_factory=time.monotonic)
    _phase: str = "opening the operation"
    _flushing: threading.Lock = field(default_factory=threading.Lock)
    _publishing: threading.Lock = field(default_factory=threading.Lock)
    # Set while a CostFlusher runs: wakes its publishing thread.
    _publish_soon: Callable[[], None] | None = None

    @property
    def model_name(self) -> str:
        """The model's full name: in its operation's project and location."""
        return Parent.of_name(self.operation.name).name("models", self.state.model_id)

    def flush(self, trainer: pl.Trainer | None = None) -> None:
        """Put the cost spent so far on record: the run directory's files, then the store."""
        self.save(trainer)
        self.publish()

    def flush_soon(self, trainer: pl.Trainer | None = None) -> None:
        """``flush``, the store's part left to the flusher's thread when one runs: the training
        loop does not wait for the store at each epoch (a remote tracking server's round trip,
        or 10 ms of SQLite)."""
        self.save(trainer)
        if self._publish_soon is None:
            self.publish()
        else:
            self._publish_soon()

    def save(self, trainer: pl.Trainer | None = None) -> None:
        """The cost so far into operation.json and state.json: quick local writes, the record
        a resume reads."""
        with self._flushing:
            self.operation.progress(self.meter.fraction_spent())
            if trainer is not None:
                self.state.global_step = trainer.global_step
            self.state.spent_seconds = self.meter.elapsed_seconds()
            self.state.save(self.run_dir)

    def publish(self) -> None:
        """The operation and its cost into the store, for other machines (it may be slow)."""
        with self._publishing:
            operation = json.loads(json.dumps(self.operation.resource))  # a consistent copy
            self.store.publish_operation(
                self.state.run_id, operation, self.state.status,
                spent_seconds=self.state.spent_seconds,
            )  # fmt: skip

    def enter(self, phase: str, flush: bool = True) -> None:
        """Say what the operation is doing now (state.json's ``phase``), and put it on record;
        until training starts, time each phase for metrics.json's ``setupSeconds``."""
        now = time.monotonic()
        if self._phase in SETUP_PHASES:
            self.setup_seconds[self._phase] = round(now - self._phase_started, 3)
        self._phase, self._phase_started = phase, now
        self.state.phase = phase
        if flush:
            self.flush()


class CostFlusher:
    """Puts the job's cost on record every ``seconds``, whatever the main thread is doing:
    checking the dataset, building the cache, testing or recording (the training loop's own
    flushes cover only its steps). After a kill -9 the cost on record is at most that old.

    Two threads: one writes the run directory's files on a fixed schedule, the other publishes
    to the store, whose writes can take longer than the schedule allows on a busy machine. The
    schedule is every half of ``seconds``: a thread runs only when the main one lets go of the
    GIL, and some of torch's and MLflow's C++ calls hold it for most of a second (seen in
    benchmarks/chaos.py as kills during recording that lost 1.4 to 1.7 s of cost at a 1 s
    schedule).
    """

    def __init__(self, job: Job, seconds: float) -> None:
        self.job, self.seconds = job, float(seconds) / 2
        self._stopped = threading.Event()
        self._publish_wanted = threading.Event()
        self._threads = [
            threading.Thread(target=self._save, name="cost-saver", daemon=True),
            threading.Thread(target=self._publish, name="cost-publisher", daemon=True),
        ]
        self._warned = False

    def __enter__(self) -> CostFlusher:
        for thread in self._threads:
            thread.start()
        self.job._publish_soon = self._publish_wanted.set
        return self

    def __exit__(self, *exc: Any) -> None:
        self.job._publish_soon = None
        self._stopped.set()
        self._publish_wanted.set()
        for thread in self._threads:
            thread.join()

    def _save(self) -> None:
        next_at = time.monotonic() + self.seconds
        while not self._stopped.wait(max(0.0, next_at - time.monotonic())):
            next_at = max(next_at + self.seconds, time.monotonic())  # a fixed schedule
            self._guarded(self.job.save)
            self._publish_wanted.set()

    def _publish(self) -> None:
        while True:
            self._publish_wanted.wait()
            if self._stopped.is_set():
                return
            self._publish_wanted.clear()
            self._guarded(self.job.publish)

    def _guarded(self, work: Any) -> None:
        try:
            work()
        except Exception as error:  # a full disk or a store that is down must not end training
            if not self._warned:
                log.warning("could not put the cost on record (%s); retrying", redact(error))
                self._warned = True


def run_training(
    cfg: dict[str, Any], run_dir: Path, start: StartFrom | None = None,
    on_open: Callable[[str, Path], None] | None = None,
) -> float:  # fmt: skip
    """Train one model as ``cfg`` says; return its best validation metric (for sweepers).
    ``on_open`` hears the operation's name and run directory once it is on record."""
    start = start or StartFrom()
    settings = validate(cfg)
    spent_before = start.state.spent_seconds if start.state else 0.0
    meter = BudgetMeter(settings.budget, settings.nodes, spent_before_seconds=spent_before)
    if meter.remaining_seconds() <= 0:
        raise UserError(
            f"the operation has spent {meter.cost_milli_node_hours()} of {settings.budget} "
            "milli-node-hours; resume it with a larger budget.train_budget_milli_node_hours"
        )
    _refuse_a_budget_below_the_reserves(cfg, meter, settings.nodes)  # before anything is billed
    if not start.state and not start.base_model_id:
        _refuse_missing_weights(cfg)
    hold_run_dir(run_dir)  # one process per operation: a second resume is refused
    _import_what_the_store_uses()  # importing code is not the operation's work
    if cfg["dataset"]["path"]:
        # A dataset that cannot train is refused in one line before any operation is opened
        # or billed, as a bad setting is: its listing tells (labels, splits), without decoding
        # a file.
        task_of(cfg).read_manifest(cfg, check_files=False)
    # Creating a tracking database that does not exist yet (1 s, MLflow's schema migrations)
    # is the store's set-up, done once for every operation to come, not this one's work.
    store = Store(cfg["mlflow"]["tracking_uri"], cfg["mlflow"]["experiment_name"])
    meter.start()  # from here on, everything is the operation's work and billed
    started_at, opened = time.time(), time.monotonic()
    operation, state = _open_operation(cfg, settings.display_name, start, store, run_dir)
    state.piece_started = started_at
    job = Job(
        cfg, settings.budget, settings.nodes, meter, start, state, operation, store,
        StopRequest(), run_dir, _phase_started=opened,
    )  # fmt: skip
    verb = "resumed" if start.state else "started"
    log.info("operation %s %s for %s in %s", operation.name, verb, job.model_name, run_dir)
    job.stop.install()
    job.flush()
    if on_open is not None:
        on_open(operation.name, run_dir)
    try:
        with CostFlusher(job, cfg["checkpoint"]["cost_flush_seconds"]):
            return _train(job)
    except TrainingInterrupted as interruption:
        state.global_step = interruption.global_step
        if interruption.cancelled:
            _end_unfinished(job, CANCELLED, CANCELLED_CODE, str(interruption))
            print(f"error: {interruption}; checkpoint and cost saved", file=sys.stderr)
        else:
            hint = f"python -m trainer resume_operation={resource_id(operation.name)}"
            _end_unfinished(job, INTERRUPTED, ABORTED, f"{interruption}; continue with {hint}")
            print(f"error: {interruption}; checkpoint and cost saved; continue with {hint}",
                  file=sys.stderr, flush=True)  # fmt: skip
            if interruption.reason == slurm.REQUEUE_SIGNAL:  # the job's time limit is near
                slurm.requeue()
        raise SystemExit(interruption.exit_code) from None
    except BaseException as error:
        code = 2 if isinstance(error, UserError) else INTERNAL
        _end_unfinished(job, FAILED, code, redact(f"{type(error).__name__}: {error}"))
        raise
    finally:
        # After a stop request the process is on its way out: keep the handler, so that a
        # second Ctrl-C during the clean-up still exits at once with 130.
        if job.stop.reason is None:
            job.stop.restore()


def _import_what_the_store_uses() -> None:
    """Import the modules MLflow loads on first use, before the meter starts, as every other
    import is: its SQL store took 1.3 s of a training's set-up on 2 cores, its model flavour
    and torch.export 0.6 s of its recording."""
    import mlflow.pytorch  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch.export  # noqa: F401


def _open_operation(
    cfg: dict[str, Any], display_name: str, start: StartFrom, store: Store, run_dir: Path
) -> tuple[Operation, RunState]:
    if start.state is not None:  # the same operation, model ID and MLflow run, going on
        state = start.state
        state.status, state.config = RUNNING, redacted_config(cfg)
        state.pid, state.host = os.getpid(), socket.gethostname()  # this process now
        store.reopen_run(state.run_id)
        api = cfg["task"]["automl_api"]
        return Operation.reopen(run_dir / "operation.json", state.operation, api), state
    task = cfg["task"]
    operation_id = os.environ.pop(OPERATION_ID_ENV, None) or new_id(task["id_prefix"])
    path, parent = run_dir / "operation.json", Parent.of_config(cfg)
    operation = Operation(operation_id, path, parent=parent, api=task["automl_api"])
    model_id = os.environ.pop(MODEL_ID_ENV, None) or new_id(task["id_prefix"])
    tags = {
        "operation": operation.name,
        "model_id": model_id,
        "base_model_id": start.base_model_id,
        "task": task["name"],
        "run_dir": str(run_dir.resolve()),
    }
    parent_run = os.environ.pop(PARENT_RUN_ENV, None)
    if parent_run:  # a sweep's trial: its run is a child of the sweep's (MLflow's own tag)
        tags["mlflow.parentRunId"] = parent_run
    # Files and the store keep the config without the tracking URI's credentials, if any.
    saved = redacted_config(cfg)
    run_id = store.start_run(display_name, tags, saved)
    state = RunState(
        operation.name, model_id, run_id, saved, utc_now(), base_model_id=start.base_model_id
    )
    return operation, state


def _end_unfinished(job: Job, status: str, code: int, message: str) -> None:
    """Record how the operation ended. If that fails too (a full disk, the store down), the
    original error still stands: this one is logged, not raised in its place."""
    try:
        job.state.status = status
        cost = job.meter.cost_milli_node_hours()
        job.operation.fail(code, f"{message} (cost so far {cost} milli-node-hours)")
        job.flush()
        tags = {"trainCostMilliNodeHours": str(cost), "state": status}
        job.store.set_tags(job.state.run_id, tags)
        job.store.end_run(job.state.run_id, "FAILED" if status == FAILED else "KILLED")
    except Exception as failure:
        log.error("could not record that the operation ended %s: %s: %s", status,
                  type(failure).__name__, redact(str(failure)))  # fmt: skip


def _train(job: Job) -> float:
    cfg, state, run_dir = job.cfg, job.state, job.run_dir
    task, model_cfg = cfg["task"], cfg["model"]
    kind = task_of(cfg)
    history = WorkHistory(cfg["home"], f"{task['name']}/{model_cfg['type']}")
    reserves = save_reserves(cfg["budget"], history)
    manifest = _checked_manifest(job, kind, reserves.recording)
    log.info("dataset: %s", kind.describe(manifest))
    _check_labels(job.start, manifest.labels)
    state.labels = manifest.labels
    cfg = job.cfg = _settle_input_size(job, kind, manifest)
    model_cfg = cfg["model"]
    pl.seed_everything(cfg["seed"], workers=True, verbose=False)

    # `auto` precision is bf16 on a GPU that supports it; it is resolved here, where the device
    # is known, in this function's copy only: the operation's config keeps `auto`.
    precision = resolve_precision(cfg["trainer"]["precision"], str(cfg["trainer"]["accelerator"]))
    cfg = {**cfg, "trainer": {**cfg["trainer"], "precision": precision}}
    job.enter("preparing data")  # the decoded-image cache is built here
    loaders = kind.loaders(manifest, cfg, job)
    train_loader, val_loader, test_loader = loaders.train, loaders.val, loaders.test
    start_checkpoint = _start_checkpoint(job)

    job.enter("building the network", flush=False)
    network = kind.network(cfg, manifest.labels, _pretrained(job, kind, start_checkpoint))
    module = kind.module(network, manifest.labels, cfg)
    # A training further (not a resume of one) warms its rate up from its first step.
    module.warm_restart = bool(job.start.base_model_id) and job.start.state is None
    # With the network built, a type not yet measured here can learn from the others' figures.
    bytes_written = checkpoint_bytes(module)
    reserves = save_reserves(cfg["budget"], history, bytes_written)

    parts = fit_parts(
        cfg, run_dir, job.meter, reserves, len(test_loader), job.stop,
        Leader(job.flush_soon, lambda: job.store.cancel_requested(state.run_id), state.run_id),
    )  # fmt: skip
    trainer, budget, checkpoints = parts.trainer, parts.budget, parts.checkpoints
    brief = write_brief(cfg, run_dir, job, reserves, start_checkpoint, network)
    if job.stop.reason:  # interrupted during set-up
        raise TrainingInterrupted(job.stop.reason, 0)
    job.enter("training")
    # weights_only: the checkpoint may come from the store (see checkpoints.load_checkpoint).
    trainer.fit(module, train_loader, val_loader, ckpt_path=start_checkpoint, weights_only=True)
    fitted = time.monotonic()
    testing = tester(trainer, brief)  # one process from here on: every TEST image once
    job.stop.training_over = True  # testing and recording take seconds: a signal waits for them
    if budget.steps_done == 0:
        raise UserError(
            f"budget.train_budget_milli_node_hours={job.budget} is too small to train "
            f"even one step after setup ({job.meter.cost_milli_node_hours()} spent, "
            f"{reserves.recording:.1f} s kept for recording the model and "
            f"{reserves.checkpoint:.1f} s for checkpoints: budget.save_reserve_seconds); raise it"
        )
    stop_reason = BUDGET_REACHED if budget.stopped_by_budget else MODEL_CONVERGED
    reported = checkpoints.reported_score
    best_score = float(trainer.callback_metrics[task["monitor"]] if reported is None else reported)

    # The final model is the best one by the validation metric that judges convergence.
    best_path = checkpoints.best_model_path or checkpoints.last_model_path
    job.enter("testing")
    test_results = testing.test(
        module, test_loader, ckpt_path=best_path, verbose=False, weights_only=True
    )[0]
    job.enter("recording")
    # Examples per second of this node's prediction, decoding included, from the TEST pass.
    node_qps = len(test_loader.dataset) / max(module.test_seconds, 1e-9) / job.nodes
    evaluation = kind.evaluation(module, manifest, manifest.labels, job.model_name)
    folder = run_dir / "evaluations" / evaluation.evaluation_id
    record_evaluation(job.store, state.run_id, folder, evaluation, "the model's TEST split")
    test_metrics = {key: float(value) for key, value in kind.test_metrics(test_results).items()}
    metrics = {
        **test_metrics,
        f"best_{task['monitor']}": best_score,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        **loaders.metrics,
        "setupSeconds": job.setup_seconds,
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("TEST: %s", ", ".join(f"{key} {value:.4f}" for key, value in test_metrics.items()))

    def resource(cost: int) -> tuple[dict[str, Any], dict[str, Any]]:
        figures = model_metadata(
            model_cfg["type"], job.budget, cost, stop_reason, node_qps, job.nodes,
            state.base_model_id,
        )  # fmt: skip
        model = model_resource(
            job.model_name, cfg["display_name"], manifest.fingerprint(), state.create_time, task,
            figures,
        )  # fmt: skip
        expire_time = add_months(state.create_time, task["model_lifespan_months"])
        details = model_details(model, task["name"], expire_time, figures)
        started_from = {"pretrainedWeights": state.pretrained_weights or "none"}
        return model, {**details, "inputSize": list(model_cfg["input_size"]), **started_from}

    example = kind.example_input(test_loader)
    started = time.monotonic()
    store = job.store
    serving, model_format = serving_network(
        kind.serving(module.backbone.eval().cpu()), example, cfg["mlflow"].get("model_format")
    )
    logged = store.log_network(state.run_id, serving, example, model_format)
    store.log_files(state.run_id, [Path(best_path)], "checkpoints")
    # Whoever trains further from this model, or loads it, checks that its checkpoint is this one.
    checkpoint_sha256 = file_sha256(Path(best_path))
    # The cost is measured once the network is logged; what follows is a few small writes.
    model, details = resource(job.meter.cost_milli_node_hours())
    extra_tags = {
        "task": task["name"],
        "labels": json.dumps(manifest.labels),
        "run_dir": str(run_dir.resolve()),
        "run_id": state.run_id,
        "operation": job.operation.name,
        "state": SUCCEEDED,
        "checkpoint_sha256": checkpoint_sha256,
        "input_size": json.dumps(list(model_cfg["input_size"])),
        "pretrained_weights": state.pretrained_weights,
    }
    store.register(state.run_id, logged, model, details, extra_tags)
    write_json_atomic(run_dir / "model.json", model)
    write_json_atomic(run_dir / "model_details.json", details)
    state.status = SUCCEEDED
    job.operation.succeed("Model", model)
    job.flush(trainer)
    names = ("model.json", "model_details.json", "metrics.json", "operation.json")
    files = [run_dir / name for name in names]
    store.log_files(state.run_id, files)
    store.end_run(state.run_id)
    now = time.monotonic()
    # What the recording reserve has to cover: all that follows training but the TEST pass's
    # batches, which the budget estimates from the validation batches. Its set-up (the
    # checkpoint restored; after DDP, the switch to one process: 1 s on 2 cores) is part of it.
    after_training = now - fitted - module.test_seconds
    history.record(
        bytes_written, recording=after_training, checkpoint=budget.boundary_saving.longest()
    )
    log.info(
        "recorded the model in %.1f s (%.1f s after training but the TEST pass, %.1f s reserved)",
        now - started, after_training, reserves.recording,
    )  # fmt: skip
    print(json.dumps(model, indent=2), flush=True)
    return best_score


def _settle_input_size(job: Job, kind: Any, manifest: Any) -> dict[str, Any]:
    """``model.input_size=auto`` made a size: the interrupted operation's or the base model's,
    else the dataset's (trainer/data/input_size.py). The settled config is what the run
    directory and the store keep, so prediction and export feed the model what it learned on."""
    model = job.cfg["model"]
    if not is_auto(model["input_size"]):
        checked_size(model["input_size"], "model.input_size")
        return job.cfg
    if job.start.input_size:
        size, why = job.start.input_size, f"base model {job.start.base_model_id}'s"
    else:
        median = kind.typical_size(manifest)
        size = list(auto_input_size(median, model, int(job.cfg["task"]["input_stride"])))
        why = f"the median TRAIN image is {median[0]}x{median[1]}" if median else "no size read"
    log.info("model.input_size=auto: %dx%d (%s; the type's largest is %s)", size[0], size[1],
             why, "x".join(map(str, model["largest_input_size"])))  # fmt: skip
    cfg = {**job.cfg, "model": {**model, "input_size": list(size)}}
    job.state.config = {**job.state.config, "model": {**job.state.config["model"],
                                                      "input_size": list(size)}}  # fmt: skip
    job.store.log_config(job.state.run_id, job.state.config)
    return cfg


def _pretrained(job: Job, kind: Any, start_checkpoint: str | None) -> Any:
    """The checked local weights the network starts from, or None: from scratch, or from a
    checkpoint (resuming, or training further), which brings its own weights."""
    if start_checkpoint is not None:
        job.state.pretrained_weights = job.state.pretrained_weights or job.start.pretrained_weights
        return None
    weights = choose(job.cfg["model"]["pretrained"], kind.pretrained_weights(job.cfg), job.cfg)
    job.state.pretrained_weights = weights.name if weights else ""
    return weights


def _refuse_missing_weights(cfg: dict[str, Any]) -> None:
    """``model.pretrained=true`` without the weights is refused before anything is billed,
    naming the command that gets them (``auto`` says so later, in one line, and goes on)."""
    if str(cfg["model"]["pretrained"]).lower() == "true":
        choose(True, task_of(cfg).pretrained_weights(cfg), cfg, check_hash=False)


def _refuse_a_budget_below_the_reserves(cfg: dict[str, Any], meter: Any, nodes: int) -> None:
    """A budget that cannot even keep the reserves for recording the model and for checkpoints
    is refused before any work is billed, naming a budget above them."""
    history = WorkHistory(cfg["home"], f"{cfg['task']['name']}/{cfg['model']['type']}")
    reserves = save_reserves(cfg["budget"], history)
    kept = reserves.recording + reserves.checkpoint
    if meter.remaining_seconds() > kept:
        return
    # What the reserves cost, after what an interrupted operation has spent already.
    reserved = milli_node_hours(meter.elapsed_seconds() + kept, nodes)
    raise UserError(
        f"budget.train_budget_milli_node_hours={meter.budget_milli_node_hours} is too small: "
        f"{reserves.recording:.1f} s are kept for recording the model and "
        f"{reserves.checkpoint:.1f} s for checkpoints (budget.save_reserve_seconds), which "
        f"leaves no time to train; use more than {reserved}"
    )


def checkpoint_bytes(module: Any) -> int:
    """About what a checkpoint of ``module`` holds: its tensors, and AdamW's two moments for
    each trainable parameter."""
    tensors = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return int(tensors + moments)


def _checked_manifest(job: Job, kind: Any, reserve_seconds: float) -> Any:
    """The dataset with its files checked, as billed work: the check stops when the budget
    could not also cover ending the operation, or when a stop is requested."""
    job.enter("checking the dataset")
    # The check looks at should_stop before each chunk of files: the time between two looks is
    # a chunk's, and the next one must fit too, with the reserve for ending the operation.
    last_look, longest_chunk = time.monotonic(), 0.0

    def should_stop() -> bool:
        nonlocal last_look, longest_chunk
        now = time.monotonic()
        longest_chunk, last_look = max(longest_chunk, now - last_look), now
        fits = job.meter.fits(reserve_seconds + 2 * longest_chunk)
        return job.stop.reason is not None or not fits

    try:
        return kind.read_manifest(job.cfg, should_stop=should_stop)
    except CheckStopped as stopped:
        if job.stop.reason is not None:
            raise TrainingInterrupted(job.stop.reason, 0) from None
        raise UserError(
            f"budget.train_budget_milli_node_hours={job.budget} ran out while checking the "
            f"dataset's files ({stopped.checked} of {stopped.total} checked); raise it"
        ) from None


def serving_network(network: Any, example: Any, wanted: str | None) -> tuple[Any, str]:
    """The network as MLflow logs it, and MLflow's serialization format for it.

    ``pt2`` (torch.export, the default) is the format MLflow loads without unpickling anything,
    even with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false; writing it takes a few seconds more
    (3.6 s for MobileNetV3-Small on this 2-core machine, benchmarks/ in the note). ``torchscript``
    loads with torch.jit.load, with no module of this project and no Python pickle of one. A
    task whose network torch.export cannot follow (a detector's NMS) serves a scripted module.
    """
    import torch

    if isinstance(network, torch.jit.ScriptModule):
        return network, "torchscript"
    if (wanted or "pt2") == "pt2" and example is not None:
        return network, "pt2"
    with torch.no_grad():
        return torch.jit.trace(network, torch.as_tensor(example)), "torchscript"


def _check_labels(start: StartFrom, labels: list[str]) -> None:
    if start.labels is None or start.labels == labels:
        return
    added = sorted(set(labels) - set(start.labels))
    missing = sorted(set(start.labels) - set(labels))
    source = "the base model" if start.base_model_id else "the interrupted operation"
    raise UserError(
        f"the dataset's labels differ from {source}'s: added {', '.join(added) or 'none'}, "
        f"missing {', '.join(missing) or 'none'}; use a dataset with the same labels"
    )


def _start_checkpoint(job: Job) -> str | None:
    """The checkpoint ``fit`` restores: weights, optimizer, scheduler and step counters."""
    if not job.start.checkpoints and not job.start.base_model_id:
        return None  # a new model from scratch
    sha256 = job.start.checkpoint_sha256
    found = load_first_good(job.start.checkpoints, sha256)
    tried = [str(p) for p in job.start.checkpoints]
    if found is None and job.start.fetch is not None:
        fetched = job.start.fetch()
        tried.append("the model's artifact in the store")
        found = load_first_good([fetched], sha256) if fetched else None
    if found is None:
        if not job.start.base_model_id:
            log.warning("no readable checkpoint of this operation: training restarts at step 0")
            return None
        tried = ", ".join(tried)
        raise UserError(
            f"the checkpoint of base model {job.start.base_model_id} is missing or unreadable "
            f"(tried {tried}); train a new model instead"
        )
    path, checkpoint = found
    if job.start.strip_callback_state:
        # A new model inherits none of the callbacks' state: its convergence, best-model tracking
        # and rate schedule (an annealing the base went through) start afresh.
        checkpoint["callbacks"] = {}
        path = job.run_dir / "start.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    log.info("starting from %s (global step %s)", path, checkpoint.get("global_step", 0))
    return str(path)
