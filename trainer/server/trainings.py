"""``models.create``: AutoML's Model message as a training's overrides, checked in this process
exactly as `python -m trainer` checks them (so a bad request costs nothing and is answered at
once), then started as a training process of its own, as ``detach=true`` starts one."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import background
from trainer.errors import UserError
from trainer.job.settings import checked_settings, model_types
from trainer.server.errors import ApiError
from trainer.settings import Settings
from trainer.store.automl import Operation, Parent, field_name
from trainer.store.resources import new_id
from trainer.sweep.space import override_literal
from trainer.tasks import task_configs

_COMPOSING = threading.Lock()  # Hydra's compose keeps global state: one request at a time


@dataclass(frozen=True)
class TrainingRequest:
    """What a CreateModel request asks for, as the task it trains and its overrides."""

    task: str
    overrides: list[str]
    base_model_id: str


def training_request(model: Any, parent: Parent) -> TrainingRequest:
    """A parsed Model message (v1, or v1beta1 for video) as a training's overrides: the task from
    its metadata field, the type, budget and base model from that field's values."""
    oneof = type(model).pb(model).WhichOneof("model_metadata")
    configs = task_configs()
    tasks = {field_name(config["metadata_key"]): name for name, config in configs.items()}
    if oneof not in tasks:
        offered = ", ".join(sorted(config["metadata_key"] for config in configs.values()))
        raise ApiError("INVALID_ARGUMENT", f"give the model one of {offered} (video models are "
                       "created through v1beta1)")  # fmt: skip
    if not model.display_name:
        raise ApiError("INVALID_ARGUMENT", "the model needs a displayName")
    task, metadata = tasks[oneof], getattr(model, oneof)
    values: dict[str, Any] = {
        "task": task,
        "display_name": model.display_name,
        "automl.project": parent.project,
        "automl.location": parent.location,
    }
    if model.dataset_id:
        values["dataset_id"] = model.dataset_id
    model_type = getattr(metadata, "model_type", "")
    if model_type:
        if model_type not in model_types(task):
            raise ApiError("INVALID_ARGUMENT", f"modelType {model_type!r} is not one of "
                           f"{task}'s: {', '.join(model_types(task))}")  # fmt: skip
        values["model_type"] = model_type
    budget = int(getattr(metadata, "train_budget_milli_node_hours", 0) or 0)
    if budget:
        values["budget.train_budget_milli_node_hours"] = budget
    base = getattr(metadata, "base_model_id", "")
    if base:
        values["base_model_id"] = base
    overrides = [f"{key}={override_literal(value)}" for key, value in values.items()]
    return TrainingRequest(task, overrides, base)


def of_base_type(wanted: TrainingRequest, base_tags: dict[str, str]) -> TrainingRequest:
    """A model trained further has its base model's type unless the request names one, as
    `python -m trainer base_model_id=...` has (app._further): checked against that type's
    bounds."""
    if any(override.startswith("model_type=") for override in wanted.overrides):
        return wanted
    model_type = base_tags.get("modelType", "")
    if model_type not in model_types(wanted.task):
        raise UserError(f"base model {wanted.base_model_id} has model type {model_type[:60]!r}, "
                        f"which task {wanted.task} does not offer")  # fmt: skip
    typed = [*wanted.overrides, f"model_type={override_literal(model_type)}"]
    return TrainingRequest(wanted.task, typed, wanted.base_model_id)


def checked(defaults: list[str], overrides: list[str]) -> Settings:
    """The settings of a training with the server's default overrides and the request's, checked
    as `python -m trainer` checks them; a mistake is a UserError (INVALID_ARGUMENT)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer import CONF_DIR

    with _COMPOSING:
        try:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                config = compose("config", [*defaults, *overrides])
            resolved = OmegaConf.to_container(config, resolve=True)
        except (HydraException, OmegaConfBaseException) as error:
            raise UserError(str(error).strip().splitlines()[0]) from None
    assert isinstance(resolved, dict)
    return checked_settings({str(k): v for k, v in resolved.items() if k != "hydra"})


def start_training(
    settings: Settings, overrides: list[str], runs: Path, environment: dict[str, str]
) -> tuple[dict[str, Any], int, Path]:
    """Start the training as a process of its own, its operation and model IDs chosen here (the
    answer names the operation at once); its Operation as first written, its pid and log."""
    task = settings.task
    operation_id, model_id = new_id(task.id_prefix), new_id(task.id_prefix)
    run_dir = runs / operation_id
    run_dir.mkdir(parents=True)
    told = {**os.environ, **environment}
    process, log = background.start_training(overrides, run_dir, told, (operation_id, model_id))
    parent = Parent(settings.automl.project, settings.automl.location)
    operation = Operation(operation_id, None, ("createModelDetails", {}), parent, task.automl_api)
    return operation.resource, process.pid, log
