"""A deployable model: the folder a model server loads (trainer/serving/main.py).

``serving.json`` holds the Model resource, the training's config (its secrets redacted) and the
labels; ``model.ckpt`` the best checkpoint, whose SHA-256 ``serving.json`` records. It is what a
deployment on this machine runs from (``<home>/serve/deployments/<ID>/package``) and what
``models export --format docker`` ships beside its Dockerfile: the model server needs neither
the store nor the run directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from trainer.errors import UserError
from trainer.settings import Workspace
from trainer.store.resources import file_sha256, write_json_atomic
from trainer.stored_model import TrainedModel, stored_settings

PACKAGE_FILE = "serving.json"
CHECKPOINT_FILE = "model.ckpt"
PACKAGE_VERSION = 1


def write_package(trained: TrainedModel, folder: Path) -> Path:
    """Write ``trained`` into ``folder`` (made, or replaced); return the folder."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copyfile(trained.checkpoint, staging / CHECKPOINT_FILE)
    write_json_atomic(
        staging / PACKAGE_FILE,
        {
            "version": PACKAGE_VERSION,
            "model": trained.model,
            "config": trained.settings.to_dict(),
            "labels": trained.labels,
            "checkpointSha256": file_sha256(staging / CHECKPOINT_FILE),
        },
    )
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def read_package(folder: Path) -> TrainedModel:
    """The model a package holds, its checkpoint checked against the recorded digest."""
    try:
        found = json.loads((folder / PACKAGE_FILE).read_text())
        model, config, labels = found["model"], found["config"], found["labels"]
        digest = found["checkpointSha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{folder} is not a serving package ({error})") from None
    model_id = str(model.get("name", "")).rsplit("/", 1)[-1]
    checkpoint = folder / CHECKPOINT_FILE
    if not checkpoint.is_file() or file_sha256(checkpoint) != digest:
        raise UserError(f"{checkpoint} is not the checkpoint {folder / PACKAGE_FILE} records")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise UserError(f"{folder / PACKAGE_FILE}: labels must be a list of strings")
    settings = stored_settings(config, model_id, Workspace.current())
    return TrainedModel(model, settings, labels, checkpoint)
