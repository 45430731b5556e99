"""A training's phases on global rank 0, in order: prepare the data, build, fit, test and
evaluate, record. Each is billed (the operation's meter runs) and says what it is doing
(``Job.enter``); the follower ranks of a DDP training share the set-up (trainer/job/fitting.py).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.data.device_augment import resolve_precision
from trainer.data.input_size import auto_input_size
from trainer.data.manifest import CheckStopped
from trainer.errors import UserError
from trainer.job.checkpoints import AtomicCheckpointIO, TrainingInterrupted, load_first_good
from trainer.job.continuation import StartFrom
from trainer.job.distributed import tester, write_brief
from trainer.job.fitting import FitParts, Leader, data_loaders, fit_parts, trained_module
from trainer.job.job import Job
from trainer.job.run_state import SUCCEEDED
from trainer.job.settings import as_classification_type
from trainer.job.work_history import SaveReserves, WorkHistory, save_reserves
from trainer.settings import Settings
from trainer.store.automl import model_details, model_metadata, model_resource
from trainer.store.evaluations import record_evaluation
from trainer.store.resources import add_months, file_sha256, write_json_atomic
from trainer.tasks import Loaders, Task, task_of
from trainer.tasks.pretrained import choose

log = logging.getLogger("trainer")

MODEL_CONVERGED = "MODEL_CONVERGED"
BUDGET_REACHED = "BUDGET_REACHED"


@dataclass
class Prepared:
    """The data phase's outcome: the settings with the input size and precision settled."""

    settings: Settings
    manifest: Any
    loaders: Loaders
    start_checkpoint: str | None


@dataclass
class Built:
    module: Any
    parts: FitParts
    reserves: SaveReserves
    bytes_written: int
    brief: Path | None


@dataclass
class Fitted:
    stop_reason: str
    best_score: float
    best_path: Path
    ended: float  # time.monotonic() when fit returned
    tester: Any  # the Trainer that runs the TEST pass


def train(job: Job) -> float:
    """The whole training; its best validation metric (what a sweeper optimizes)."""
    kind = task_of(job.settings)
    history = WorkHistory(job.settings.home, f"{job.settings.task.name}/{job.settings.model.type}")
    data = prepare_data(job, kind, history)
    built = build(job, kind, data, history)
    fitted = fit(job, built, data)
    node_qps = test_and_evaluate(job, kind, built, fitted, data)
    recording_started = record(job, kind, data, built, fitted, node_qps)
    _learn_reserves(history, built, fitted, recording_started)
    return fitted.best_score


# -- preparing the data ----------------------------------------------------------------------


def prepare_data(job: Job, kind: Task, history: WorkHistory) -> Prepared:
    """The dataset checked file by file (billed), the input size settled from it, the loaders
    (a decoded-image cache built here), and the checkpoint the training starts from."""
    manifest = _checked_manifest(job, kind, save_reserves(job.settings.budget, history).recording)
    log.info("dataset: %s", kind.describe(manifest))
    _check_labels(job.start, manifest.labels)
    job.state.labels = manifest.labels
    job.settings = _settle_input_size(job, kind, manifest)
    job.settings = _settle_classification_type(job, manifest)
    # `auto` precision is bf16 on a GPU that supports it: resolved where the device is known,
    # for this training only (the operation's settings keep `auto`).
    trainer = job.settings.trainer
    settings = job.settings.replace_in(
        "trainer", precision=resolve_precision(trainer.precision, trainer.accelerator)
    )
    job.enter("preparing data")
    loaders = data_loaders(settings, kind, manifest, job)
    return Prepared(settings, manifest, loaders, _start_checkpoint(job))


def _checked_manifest(job: Job, kind: Task, reserve_seconds: float) -> Any:
    """The dataset with its files checked, as billed work: the check stops when the budget
    could not also cover ending the operation, or when a stop is requested."""
    job.enter("checking the dataset")
    try:
        return kind.read_manifest(job.settings, should_stop=_BudgetLook(job, reserve_seconds))
    except CheckStopped as stopped:
        if job.stop.reason is not None:
            raise TrainingInterrupted(job.stop.reason, 0) from None
        raise UserError(
            f"budget.train_budget_milli_node_hours={job.budget} ran out while checking the "
            f"dataset's files ({stopped.checked} of {stopped.total} checked); raise it"
        ) from None


class _BudgetLook:
    """Asked before each chunk of files: stop when a stop is requested, or when the next chunk
    (as long as the longest so far) and the reserve for ending the operation would not fit."""

    def __init__(self, job: Job, reserve_seconds: float) -> None:
        self.job, self.reserve_seconds = job, reserve_seconds
        self.last_look, self.longest_chunk = time.monotonic(), 0.0

    def __call__(self) -> bool:
        now = time.monotonic()
        self.longest_chunk, self.last_look = max(self.longest_chunk, now - self.last_look), now
        fits = self.job.meter.fits(self.reserve_seconds + 2 * self.longest_chunk)
        return self.job.stop.reason is not None or not fits


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


def _settle_input_size(job: Job, kind: Task, manifest: Any) -> Settings:
    """``model.input_size=auto`` made a size: the interrupted operation's or the base model's,
    else the dataset's (trainer/data/input_size.py). The settled settings are what the run
    directory and the store keep, so prediction and export feed the model what it learned on."""
    model = job.settings.model
    if model.input_size != "auto":
        return job.settings
    if job.start.input_size:
        size, why = job.start.input_size, f"base model {job.start.base_model_id}'s"
    else:
        median = kind.typical_size(manifest)
        size = list(auto_input_size(median, model, job.settings.task.input_stride))
        why = f"the median TRAIN image is {median[0]}x{median[1]}" if median else "no size read"
    log.info("model.input_size=auto: %dx%d (%s; the type's largest is %s)", size[0], size[1],
             why, "x".join(map(str, model.largest_input_size)))  # fmt: skip
    settled = job.settings.replace_in("model", input_size=list(size))
    job.state.config = settled.to_dict()
    job.store.log_config(job.state.run_id, job.state.config)
    return settled


def _settle_classification_type(job: Job, manifest: Any) -> Settings:
    """An image classification's ``dataset.classification_type`` made the dataset's (``auto``
    reads MULTILABEL when a row has several labels), and a MULTILABEL model's monitor (its task
    conf's ``multilabel``): what the run directory and the store keep, so that evaluation and
    prediction score each label on its own."""
    found = getattr(manifest, "classification_type", None)
    settings = job.settings
    if found is None:  # a task of one label an example
        return settings
    if job.start.classification_type not in (None, found):
        source = "the base model" if job.start.base_model_id else "the interrupted operation"
        raise UserError(
            f"the dataset reads as {found} but {source} is {job.start.classification_type}; "
            f"set dataset.classification_type={job.start.classification_type} or train a new "
            "model"
        )
    settled = as_classification_type(settings, found)
    if settled != settings:
        log.info("dataset.classification_type: %s", found)
        job.state.config = settled.to_dict()
        job.store.log_config(job.state.run_id, job.state.config)
    return settled


def _start_checkpoint(job: Job) -> str | None:
    """The checkpoint ``fit`` restores: weights, optimizer, scheduler and step counters."""
    start = job.start
    if not start.checkpoints and not start.base_model_id:
        return None  # a new model from scratch
    found = load_first_good(start.checkpoints, start.checkpoint_sha256)
    tried = [str(p) for p in start.checkpoints]
    if found is None and start.fetch is not None:
        fetched = start.fetch()
        tried.append("the model's artifact in the store")
        found = load_first_good([fetched], start.checkpoint_sha256) if fetched else None
    if found is None:
        if not start.base_model_id:
            log.warning("no readable checkpoint of this operation: training restarts at step 0")
            return None
        raise UserError(
            f"the checkpoint of base model {start.base_model_id} is missing or unreadable "
            f"(tried {', '.join(tried)}); train a new model instead"
        )
    path, checkpoint = found
    if start.strip_callback_state:
        # A new model inherits none of the callbacks' state: its convergence, best-model tracking
        # and rate schedule (an annealing the base went through) start afresh.
        checkpoint["callbacks"] = {}
        path = job.run_dir / "start.ckpt"
        AtomicCheckpointIO().save_checkpoint(checkpoint, path)
    log.info("starting from %s (global step %s)", path, checkpoint.get("global_step", 0))
    return str(path)


# -- building ------------------------------------------------------------------------------


def build(job: Job, kind: Task, data: Prepared, history: WorkHistory) -> Built:
    """The network (from pretrained weights, or a checkpoint's), its module, the Trainer and its
    callbacks; the brief the other ranks of a DDP training follow."""
    job.enter("building the network", flush=False)
    pretrained = _pretrained(job, kind, data.start_checkpoint)
    # A training further (not a resume of one) warms its rate up from its first step.
    warm_restart = bool(job.start.base_model_id) and job.start.state is None
    module = trained_module(data.settings, kind, data.manifest.labels, pretrained, warm_restart)
    # With the network built, a type not yet measured here can learn from the others' figures.
    bytes_written = checkpoint_bytes(module)
    reserves = save_reserves(data.settings.budget, history, bytes_written)
    run_id = job.state.run_id
    leader = Leader(job.flush_soon, lambda: job.store.cancel_requested(run_id), run_id)
    parts = fit_parts(
        data.settings, job.run_dir, job.meter, reserves, len(data.loaders.test), job.stop, leader
    )
    brief = write_brief(
        data.settings, job.run_dir, job, reserves, data.start_checkpoint, module.backbone
    )
    if job.stop.reason:  # interrupted during set-up
        raise TrainingInterrupted(job.stop.reason, 0)
    return Built(module, parts, reserves, bytes_written, brief)


def _pretrained(job: Job, kind: Task, start_checkpoint: str | None) -> Any:
    """The checked local weights the network starts from, or None: from scratch, or from a
    checkpoint (resuming, or training further), which brings its own weights."""
    if start_checkpoint is not None:
        job.state.pretrained_weights = job.state.pretrained_weights or job.start.pretrained_weights
        return None
    settings = job.settings
    weights = choose(settings.model.pretrained, kind.pretrained_weights(settings.model), settings)
    job.state.pretrained_weights = weights.name if weights else ""
    return weights


def checkpoint_bytes(module: Any) -> int:
    """About what a checkpoint of ``module`` holds: its tensors, and AdamW's two moments for
    each trainable parameter."""
    tensors = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return int(tensors + moments)


# -- fitting -------------------------------------------------------------------------------


def fit(job: Job, built: Built, data: Prepared) -> Fitted:
    """Train until the budget is spent or the model has converged; the best checkpoint."""
    job.enter("training")
    trainer, budget, checkpoints = built.parts.trainer, built.parts.budget, built.parts.checkpoints
    # weights_only: the checkpoint may come from the store (see checkpoints.load_checkpoint).
    trainer.fit(
        built.module, data.loaders.train, data.loaders.val, ckpt_path=data.start_checkpoint,
        weights_only=True,
    )  # fmt: skip
    ended = time.monotonic()
    testing = tester(trainer, built.brief)  # one process from here on: every TEST image once
    job.stop.training_over = True  # testing and recording take seconds: a signal waits for them
    if budget.steps_done == 0:
        raise UserError(
            f"budget.train_budget_milli_node_hours={job.budget} is too small to train "
            f"even one step after setup ({job.meter.cost_milli_node_hours()} spent, "
            f"{built.reserves.recording:.1f} s kept for recording the model and "
            f"{built.reserves.checkpoint:.1f} s for checkpoints: budget.save_reserve_seconds); "
            "raise it"
        )
    stop_reason = BUDGET_REACHED if budget.stopped_by_budget else MODEL_CONVERGED
    reported = checkpoints.reported_score
    monitor = job.settings.task.monitor
    best_score = float(trainer.callback_metrics[monitor] if reported is None else reported)
    # The final model is the best one by the validation metric that judges convergence.
    best_path = Path(checkpoints.best_model_path or checkpoints.last_model_path)
    return Fitted(stop_reason, best_score, best_path, ended, testing)


# -- testing and evaluating ------------------------------------------------------------------


def test_and_evaluate(job: Job, kind: Task, built: Built, fitted: Fitted, data: Prepared) -> float:
    """The best checkpoint's TEST pass, its evaluation on record and metrics.json; the node's
    examples per second of prediction (decoding included) from that pass."""
    job.enter("testing")
    module, test_loader = built.module, data.loaders.test
    results = fitted.tester.test(
        module, test_loader, ckpt_path=str(fitted.best_path), verbose=False, weights_only=True
    )[0]
    job.enter("recording")
    examples = len(test_loader.dataset)  # type: ignore[arg-type]  # every Dataset here is Sized
    node_qps = examples / max(module.test_seconds, 1e-9) / job.nodes
    evaluation = kind.evaluation(module, data.manifest, data.manifest.labels, job.model_name)
    folder = job.run_dir / "evaluations" / evaluation.evaluation_id
    record_evaluation(job.store, job.state.run_id, folder, evaluation, "the model's TEST split")
    test_metrics = {key: float(value) for key, value in kind.test_metrics(results).items()}
    metrics = {
        **test_metrics,
        f"best_{job.settings.task.monitor}": fitted.best_score,
        "epochs": built.parts.trainer.current_epoch,
        "global_step": built.parts.trainer.global_step,
        **data.loaders.metrics,
        "setupSeconds": job.setup_seconds,
    }
    write_json_atomic(job.run_dir / "metrics.json", metrics)
    log.info("TEST: %s", ", ".join(f"{key} {value:.4f}" for key, value in test_metrics.items()))
    return node_qps


# -- recording -------------------------------------------------------------------------------


def record(
    job: Job, kind: Task, data: Prepared, built: Built, fitted: Fitted, node_qps: float
) -> float:
    """The network logged, the model registered with its resources, the operation succeeded;
    when this began (time.monotonic())."""
    started, state, store, module = time.monotonic(), job.state, job.store, built.module
    example = kind.example_input(data.loaders.test)
    serving, model_format = serving_network(
        kind.serving(module.backbone.eval().cpu()), example, job.settings.mlflow.model_format
    )
    logged = _log_network(job, serving, example, model_format)
    store.log_files(state.run_id, [fitted.best_path], "checkpoints")
    # The cost is measured once the network is logged; what follows is a few small writes.
    model, details = _resources(job, data, fitted, node_qps, job.meter.cost_milli_node_hours())
    store.register(state.run_id, logged, model, details, _model_tags(job, data, fitted))
    write_json_atomic(job.run_dir / "model.json", model)
    write_json_atomic(job.run_dir / "model_details.json", details)
    state.status = SUCCEEDED
    job.operation.succeed("Model", model)
    job.flush(built.parts.trainer)
    names = ("model.json", "model_details.json", "metrics.json", "operation.json")
    store.log_files(state.run_id, [job.run_dir / name for name in names])
    store.end_run(state.run_id)
    _print_model(model)
    return started


def _print_model(model: dict[str, Any]) -> None:
    """The Model on stdout, for scripts. The training has succeeded by now: a reader that has
    gone (``| head``, a closed terminal) changes nothing of that."""
    try:
        print(json.dumps(model, indent=2), flush=True)
    except OSError as error:  # BrokenPipeError among them
        log.warning("could not print the model (%s); it is in model.json", error)
        # Python would flush stdout again at exit, fail again and exit with 120.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _resources(
    job: Job, data: Prepared, fitted: Fitted, node_qps: float, cost: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Model resource and model_details.json at ``cost``."""
    settings, state = job.settings, job.state
    figures = model_metadata(
        settings.model.type, job.budget, cost, fitted.stop_reason, node_qps, job.nodes,
        state.base_model_id,
    )  # fmt: skip
    model = model_resource(
        job.model_name, settings.display_name, settings.dataset_id or data.manifest.fingerprint(),
        state.create_time, settings.task, figures,
    )  # fmt: skip
    expire_time = add_months(state.create_time, settings.task.model_lifespan_months)
    details = model_details(model, settings.task.name, expire_time, figures)
    started_from = {"pretrainedWeights": state.pretrained_weights or "none"}
    return model, {**details, "inputSize": list(settings.model.size), **started_from}


def _model_tags(job: Job, data: Prepared, fitted: Fitted) -> dict[str, Any]:
    state = job.state
    return {
        "task": job.settings.task.name,
        "labels": json.dumps(data.manifest.labels),
        "run_dir": str(job.run_dir.resolve()),
        "run_id": state.run_id,
        "operation": job.operation.name,
        "state": SUCCEEDED,
        # Whoever trains further from this model, or loads it, checks that its checkpoint is
        # this one.
        "checkpoint_sha256": file_sha256(fitted.best_path),
        "input_size": json.dumps(list(job.settings.model.size)),
        "pretrained_weights": state.pretrained_weights,
        **_classification_type_tag(job.settings),
    }


def _classification_type_tag(settings: Settings) -> dict[str, str]:
    """A classifier's settled MULTICLASS or MULTILABEL (_settle_classification_type)."""
    if settings.task.multilabel is None:
        return {}
    return {"classification_type": settings.dataset.classification_type}


def _learn_reserves(history: WorkHistory, built: Built, fitted: Fitted, started: float) -> None:
    """What the recording reserve has to cover: all that follows training but the TEST pass's
    batches, which the budget estimates from the validation batches. Its set-up (the
    checkpoint restored; after DDP, the switch to one process: 1 s on 2 cores) is part of it."""
    now = time.monotonic()
    after_training = now - fitted.ended - built.module.test_seconds
    checkpoint = built.parts.budget.boundary_saving.longest()
    history.record(built.bytes_written, recording=after_training, checkpoint=checkpoint)
    log.info(
        "recorded the model in %.1f s (%.1f s after training but the TEST pass, %.1f s reserved)",
        now - started, after_training, built.reserves.recording,
    )  # fmt: skip


def _log_network(job: Job, network: Any, example: Any, model_format: str) -> Any:
    """Logged so that MLflow loads it without unpickling anything: a pt2 program in its
    pytorch flavour (whose TorchScript it keeps under its pickle label, and then refuses to
    load with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false), a scripted module as a pyfunc logged
    as code that runs torch.jit.load."""
    if model_format == "pt2":
        return job.store.log_network(job.state.run_id, network, example)
    import torch

    from trainer.tasks import torchscript_pyfunc

    saved = job.run_dir / "checkpoints" / "serving.pt"  # the checkpoints' own folder
    torch.jit.save(network, str(saved))
    try:
        code, example = Path(torchscript_pyfunc.__file__), torch.as_tensor(example).numpy()
        artifacts = {torchscript_pyfunc.ARTIFACT: saved}
        return job.store.log_code_model(job.state.run_id, code, artifacts, example)
    finally:
        saved.unlink(missing_ok=True)


def serving_network(network: Any, example: Any, wanted: str) -> tuple[Any, str]:
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
    if wanted == "pt2" and example is not None:
        return network, "pt2"
    with torch.no_grad():
        return torch.jit.trace(network, torch.as_tensor(example)), "torchscript"
