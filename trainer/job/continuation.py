"""Starting a training from earlier work: a base model (training further) or an interrupted
operation (resuming). Both are checked before any training; a refusal is a UserError."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from trainer.errors import UserError
from trainer.job.run_state import RunState, hold_run_dir
from trainer.settings import MULTICLASS, MULTILABEL, Settings, checked_size, redact
from trainer.store.automl import bare_id, recorded_details
from trainer.store.resources import (
    SPENT_SECONDS,
    check_id,
    downloads,
    expired_on,
    parse_time,
    stored_labels,
)

log = logging.getLogger("trainer")

# What a resumed operation may change, by override key prefix; everything else is fixed.
MAY_CHANGE_ON_RESUME = (
    "budget.",
    "optimizer.",
    "data.batch_size",
    "data.num_workers",
    "data.cache",  # and cache_max_gb, cache_num_workers: how images are read, not what
    "early_stopping.",
    "checkpoint.",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.precision",
    "trainer.compile",  # and compile_reserve_seconds
    "trainer.channels_last",
    "mlflow.",
    "dataset.path",  # a moved dataset; its labels are checked once it is read
)
IGNORED_ON_RESUME = ("resume_operation", "hydra.", "detach")  # how it runs, not what


@dataclass
class StartFrom:
    """Where a training starts: a checkpoint to restore, and what it must stay consistent with."""

    checkpoints: list[Path] = field(default_factory=list)  # the first that loads is used
    labels: list[str] | None = None
    state: RunState | None = None  # set when resuming an operation
    base_model_id: str = ""
    strip_callback_state: bool = False  # a new model restarts convergence, best-tracking, schedule
    # The base model's checkpoint from the store, when no local one is good: called once the
    # budget's meter runs, since downloading is the operation's work too.
    fetch: Callable[[], Path | None] | None = None
    checkpoint_sha256: str | None = None  # recorded with the base model: only that file will do
    input_size: list[int] | None = None  # the base model's: what model.input_size=auto keeps
    classification_type: str | None = None  # MULTICLASS or MULTILABEL: the dataset must agree
    pretrained_weights: str = ""  # what the base model started from


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [(o.key_or_group, o.value()) for o in parsed]


def explicit_keys(overrides: list[str]) -> set[str]:
    return {key for key, _ in parse_overrides(overrides)}


# -- training further from a base model ----------------------------------------------------


def base_model_tags(store: Any, base_model_id: str) -> dict[str, str]:
    model_id = bare_id(str(base_model_id), "models")
    tags = store.registered_tags(model_id)
    if tags is None or "model_id" not in tags:  # none, or another project's registry entry
        raise UserError(
            f"base_model_id={base_model_id!r} is not a model in {store.tracking_uri}; "
            "list models in the MLflow registry or check mlflow.tracking_uri"
        )
    return tags


def check_base_model(settings: Settings, tags: dict[str, str]) -> None:
    model_id = tags["model_id"]
    task, model_type = settings.task.name, settings.model.type
    if tags.get("task") != task:
        raise UserError(
            f"base model {model_id} is a {tags.get('task')} model, not "
            f"{task}; train further with task={tags.get('task')}"
        )
    if tags.get("modelType") != model_type:
        raise UserError(
            f"base model {model_id} is model_type={tags.get('modelType')}, not "
            f"{model_type}; drop model_type= or set model_type={tags.get('modelType')}"
        )
    expire = expired_on(tags)
    if expire:
        raise UserError(
            f"base model {model_id} expired on {expire}; it can be listed and deleted, "
            "not trained further: train a new model instead"
        )
    created = parse_time(tags["create_time"])
    age_days = (datetime.now(timezone.utc) - created).total_seconds() / 86400
    limit = settings.resume.max_base_model_age_days
    if age_days > limit:
        raise UserError(
            f"base model {model_id} was created {age_days:.1f} days ago, more than "
            f"resume.max_base_model_age_days={limit}; train a new model instead"
        )


def from_base_model(settings: Settings, store: Any, tags: dict[str, str]) -> StartFrom:
    check_base_model(settings, tags)
    model_id = check_id(tags["model_id"], "the base model's stored ID")
    run_dir = Path(tags.get("run_dir", ""))
    checkpoints = [
        run_dir / "checkpoints" / "best.ckpt",
        run_dir / "checkpoints" / "best.prev.ckpt",
    ]

    def fetch() -> Path | None:
        # A model on a remote tracking server, or a local file gone bad: the checkpoint is also
        # an artifact of the model's run.
        if "run_id" not in tags:
            return None
        folder = downloads(settings.home, model_id)
        return store.download(tags["run_id"], "checkpoints/best.ckpt", folder)

    return StartFrom(
        checkpoints=checkpoints,
        labels=stored_labels(tags.get("labels", "")),
        base_model_id=model_id,
        strip_callback_state=True,
        fetch=fetch,
        checkpoint_sha256=tags.get("checkpoint_sha256") or None,
        input_size=stored_input_size(tags.get("input_size", "")),
        pretrained_weights=str(tags.get("pretrained_weights", ""))[:200],
        classification_type=stored_classification_type(settings, tags),
    )


def stored_classification_type(settings: Settings, tags: dict[str, str]) -> str | None:
    """A base classifier's MULTICLASS or MULTILABEL (MULTICLASS when recorded before MULTILABEL
    models existed); None for a task without MULTILABEL models."""
    if settings.task.multilabel is None:
        return None
    found = tags.get("classification_type", MULTICLASS)
    return found if found in (MULTICLASS, MULTILABEL) else MULTICLASS


def stored_input_size(text: str) -> list[int] | None:
    """A base model's recorded [height, width], checked as user input would be (None for a
    model recorded before it was, or an unreadable value)."""
    try:
        return list(checked_size(json.loads(text), "the base model's input_size"))
    except (TypeError, ValueError, UserError):
        return None


# -- resuming an interrupted operation ------------------------------------------------------


def resume_config(saved: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The operation's own config, with the user's overrides that may change applied."""
    config = OmegaConf.create(saved)
    for key, value in parse_overrides(overrides):
        if key.startswith(IGNORED_ON_RESUME):
            continue
        if not key.startswith(MAY_CHANGE_ON_RESUME):
            current = _group_choice(saved, key)
            if current is not None and value == current:
                continue
            raise UserError(
                f"{key} may not change when resuming an operation (it is {current!r}); "
                f"drop it, or start a new training. May change: {', '.join(MAY_CHANGE_ON_RESUME)}"
            )
        before = OmegaConf.select(config, key)
        if before != value:
            OmegaConf.update(config, key, value, force_add=True)
            log.info("resume: %s changed from %s to %s", key, redact(repr(before)),
                     redact(repr(value)))  # fmt: skip
    resolved = OmegaConf.to_container(config, resolve=True)
    assert isinstance(resolved, dict)
    return {str(key): value for key, value in resolved.items()}


def _group_choice(saved: dict[str, Any], key: str) -> Any:
    if key == "model_type":
        return saved["model"]["type"]
    if key == "task":
        return saved["task"]["name"]
    return OmegaConf.select(OmegaConf.create(saved), key)


def resume_candidates(run_dir: Path) -> list[Path]:
    """Newest first; a training further that never checkpointed restarts from its base."""
    from trainer.job.checkpoints import BEST, LAST, previous  # torch: only when resuming

    directory = run_dir / "checkpoints"
    last, best = directory / LAST, directory / BEST
    return [last, previous(last), best, previous(best), run_dir / "start.ckpt"]


def for_resume(store: Any, operation_id: str) -> tuple[Path, RunState]:
    try:
        run = store.run_of_operation(bare_id(str(operation_id), "operations"))
    except UserError:
        run = None
    if run is None:
        raise UserError(
            f"resume_operation={operation_id!r} is not an operation in {store.tracking_uri}; "
            "check the ID and mlflow.tracking_uri"
        )
    name = run.data.tags.get("operation", operation_id)
    run_dir = Path(run.data.tags.get("run_dir", ""))
    if not (run_dir / "state.json").is_file():
        raise UserError(
            f"operation {name}'s run directory {run_dir} is not on this machine (or has no "
            "state.json); resume it where it ran"
        )
    hold_run_dir(run_dir)  # before reading its state: a second resume is refused here
    state = RunState.load(run_dir)
    state.at_least(run.data.tags.get(SPENT_SECONDS))
    if state.status == "CANCELLED" or (
        state.status == "SUCCEEDED"
        and recorded_details(run_dir).get("stopReason") != "BUDGET_REACHED"
    ):
        raise UserError(
            f"operation {name} has {state.status.lower()}; only interrupted ones, and finished "
            "ones that stopped BUDGET_REACHED (given a larger budget), can be resumed"
        )
    if state.status == "SUCCEEDED":
        # A sweep's promotion, or a user's: the same model trains on from its last checkpoint,
        # optimizer state and step included, up to the larger budget given.
        log.info("operation %s stopped BUDGET_REACHED: it goes on with a larger budget", name)
    if state.still_running():
        raise UserError(f"operation {name} is still running (process {state.pid}); stop it first")
    return run_dir, state
