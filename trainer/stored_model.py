"""A model on record, loaded back for export, evaluation and prediction.

It sits above trainer/tasks/ (the task builds the network the checkpoint fills), so it is not
part of trainer/store/, which knows no task.

The Model resource and its registry tags say where its run directory is; when that directory is
not on this machine (a shared tracking server), the config and best checkpoint come from the
run's MLflow artifacts instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import UserError
from trainer.store.resources import expired_on
from trainer.tasks import task_of

DOWNLOADS = Path(".model-cache")  # artifacts fetched from a remote store, per model ID


@dataclass
class TrainedModel:
    model: dict[str, Any]  # the Model resource
    config: dict[str, Any]  # the training's resolved config
    labels: list[str]
    checkpoint: Path
    run_id: str = ""

    @property
    def model_id(self) -> str:
        return self.model["name"].split("/")[1]

    def manifest(self) -> Any:
        """The dataset the model was trained on (its splits as in training)."""
        return task_of(self.config).read_manifest(self.config)


def trained_model(catalog: Any, model_id: str, purpose: str) -> TrainedModel:
    """The Model resource, config, labels and best checkpoint of a stored, unexpired model.

    ``purpose`` names what the model is wanted for, in the error an expired model gives.
    """
    model, tags = catalog.model_and_tags(model_id)
    model_id = model["name"].split("/")[1]
    expire = expired_on(tags)
    if expire:
        raise UserError(
            f"model {model_id} expired on {expire}; it can be listed and deleted, "
            f"not used for {purpose}"
        )
    run_dir = Path(tags.get("run_dir", ""))
    scratch = DOWNLOADS / model_id
    config_path = run_dir / "state.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())["config"]
    else:
        fetched = catalog.client.download_artifacts(tags["run_id"], "config.json", str(scratch))
        config = json.loads(Path(fetched).read_text())
    checkpoint = run_dir / "checkpoints" / "best.ckpt"
    if not checkpoint.is_file():
        checkpoint = Path(
            catalog.client.download_artifacts(tags["run_id"], "checkpoints/best.ckpt", str(scratch))
        )
    return TrainedModel(model, config, json.loads(tags["labels"]), checkpoint, tags["run_id"])


def load_network(trained: TrainedModel) -> nn.Module:
    """The trained network alone, in eval mode, on the CPU."""
    task = task_of(trained.config)
    network = task.network(trained.config, trained.labels, pretrained=False)
    checkpoint = torch.load(trained.checkpoint, map_location="cpu", weights_only=False)
    prefix = "backbone."
    weights = {
        key.removeprefix(prefix): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    network.load_state_dict(weights)
    return network.eval()
