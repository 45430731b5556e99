"""A model on record, loaded back for export, evaluation and prediction.

It sits above trainer/tasks/ (the task builds the network the checkpoint fills), so it is not
part of trainer/store/, which knows no task.

The Model resource and its registry tags say where its run directory is; when that directory is
not on this machine (a shared tracking server), the config and best checkpoint come from the
run's MLflow artifacts instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from trainer.errors import UserError, first_line
from trainer.job.checkpoints import load_checkpoint
from trainer.job.ids import OPERATION_ID_ENV
from trainer.settings import Settings, Workspace, migrate
from trainer.store.automl import Operation, Parent, resource_id
from trainer.store.resources import (
    check_id,
    check_name,
    downloads,
    file_sha256,
    new_id,
    stored_labels,
)
from trainer.tasks import task_of


@dataclass
class TrainedModel:
    model: dict[str, Any]  # the Model resource
    settings: Settings  # the training's, as saved (migrated from an older version's)
    labels: list[str]
    checkpoint: Path
    run_id: str = ""

    @property
    def model_id(self) -> str:
        return resource_id(self.model["name"])

    def new_operation(self, details: tuple[str, dict[str, Any]]) -> Operation:
        """An operation on this model (a batch prediction, an export)."""
        return model_operation(self.model, self.settings.task.automl_api, details)

    def manifest(self) -> Any:
        """The dataset the model was trained on (its splits as in training)."""
        return task_of(self.settings).read_manifest(self.settings)


def model_operation(
    model: dict[str, Any], api: str, details: tuple[str, dict[str, Any]]
) -> Operation:
    """An operation on ``model``: in the model's own project and location, of its task's AutoML
    ``api``, with the ID the API server chose (and answered with) where it started this one."""
    operation_id = os.environ.pop(OPERATION_ID_ENV, None) or new_id(resource_id(model["name"])[:3])
    return Operation(operation_id, None, details, Parent.of_name(model["name"]), api)


def trained_model(catalog: Any, model_id: str, purpose: str) -> TrainedModel:
    """The Model resource, config, labels and best checkpoint of a stored, unexpired model.

    ``purpose`` names what the model is wanted for, in the error an expired model gives. What
    the store holds is checked as user input is: the ID, the labels, the checkpoint against the
    digest recorded with the model; the config's home is this process's own.
    """
    model, tags = catalog.usable_model(model_id, purpose)
    model_id = check_id(resource_id(model["name"]), "the stored model ID")
    # It names the files and folders of predictions and exports.
    check_name(f"model {model_id}'s stored displayName", str(model.get("displayName")))
    run_dir = Path(tags.get("run_dir", ""))
    workspace = Workspace.current()  # read once: its home and store are this process's
    scratch = downloads(workspace.home, model_id)

    def fetch(artifact: str) -> Path:
        return Path(catalog.client.download_artifacts(tags["run_id"], artifact, str(scratch)))

    config_path = run_dir / "state.json"
    try:
        if config_path.is_file():
            config = json.loads(config_path.read_text())["config"]
        else:
            config = json.loads(fetch("config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"the config of model {model_id} cannot be read ({error})") from None
    settings = stored_settings(config, model_id, workspace)
    checkpoint = _verified_checkpoint(
        run_dir / "checkpoints" / "best.ckpt",
        lambda: fetch("checkpoints/best.ckpt"),
        tags.get("checkpoint_sha256"),
        model_id,
    )
    labels = stored_labels(tags.get("labels", ""))
    return TrainedModel(model, settings, labels, checkpoint, tags["run_id"])


def stored_settings(config: Any, model_id: str, workspace: Workspace) -> Settings:
    """The training's settings as the store keeps them, migrated from an older version's shape;
    the home is this process's (demo datasets are regenerated under it, never a path the
    store names), and so is the store."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"the config stored with model {model_id} is not a training config")
    try:
        migrated = migrate(config)
    except (KeyError, TypeError, AttributeError):
        raise UserError(
            f"the config stored with model {model_id} is not a training config"
        ) from None
    mlflow = {**migrated["mlflow"], "tracking_uri": workspace.tracking_uri}
    return Settings.parse({**migrated, "home": workspace.home, "mlflow": mlflow})


def _verified_checkpoint(
    local: Path, fetch: Callable[[], Path], sha256: str | None, model_id: str
) -> Path:
    """The local checkpoint, else the store's copy, whichever has the recorded digest (models
    recorded before digests were kept have none: either file is taken as it is)."""
    if local.is_file() and (not sha256 or file_sha256(local) == sha256):
        return local
    fetched = fetch()
    if sha256 and file_sha256(fetched) != sha256:
        raise UserError(
            f"the checkpoint of model {model_id} is not the one recorded with it (its SHA-256 "
            "differs); it was changed after training and is refused"
        )
    return fetched


def load_network(trained: TrainedModel) -> nn.Module:
    """The trained network alone, in eval mode, on the CPU."""
    network = task_of(trained.settings).network(trained.settings, trained.labels, pretrained=None)
    try:
        checkpoint = load_checkpoint(trained.checkpoint)
    except Exception as error:  # a damaged or hostile file raises anything from pickle to zip
        first = first_line(error, 200)
        raise UserError(
            f"the checkpoint of model {trained.model_id} does not load as weights ({first})"
        ) from None
    prefix = "backbone."
    weights = {
        key.removeprefix(prefix): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    network.load_state_dict(weights)
    return network.eval()
