"""Pretrained weights from the local torch hub cache: found, checked, loaded; never downloaded.

``model.pretrained`` is ``auto`` (torchvision's weights for the type's network when they are in
the cache, else from scratch, said in one line), ``true`` (the weights or exit 2 with the command
that gets them) or ``false``. Only ``python -m trainer weights download`` (trainer/weights.py)
fetches a file: a download inside a budget would bill the network's speed, and trainings and
tests run offline.

A cached file is trusted when its SHA-256 starts with the hash in its name, as torchvision
publishes them (torch.hub checks that on download but not when it reads a cached file), or when
a sidecar written by ``write_project_weights`` records its digest: the project's own files (a
test's, or a user's converted weights) have no published hash. It is read with
``weights_only=True``: nothing in it runs.

Weights are loaded by name and shape into a network built for our labels: what depends on the
number of labels (a classifier's last layer, a detector's class heads) keeps its fresh
initialization, everything else starts from the weights. ``PRETRAINED_NAMES`` on the network
lists the parameters that came from them, for the fine-tuning schedule (``fine_tuning``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchvision import models

from trainer.errors import UserError
from trainer.settings import OptimizerSettings, Settings, pretrained_mode
from trainer.store.resources import file_sha256

log = logging.getLogger("trainer")

PRETRAINED_NAMES = "pretrained_parameter_names"  # an attribute set on a network that has them
SIDECAR_SUFFIX = ".vision-trainer.json"
HASH_IN_NAME = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's convention: name-<sha256 prefix>.pth


@dataclass(frozen=True)
class LocalWeights:
    """Checked weights in the cache: ``name`` is torchvision's, e.g.
    ``MobileNet_V3_Small_Weights.IMAGENET1K_V1``."""

    name: str
    path: Path

    def state_dict(self) -> dict[str, torch.Tensor]:
        return torch.load(self.path, map_location="cpu", weights_only=True)


def torchvision_weights(constructor: str) -> models.WeightsEnum | None:
    """torchvision's default weights for a builder, or None when it publishes none."""
    try:
        return models.get_model_weights(constructor).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def weights_url(weights: models.WeightsEnum) -> str:
    """Where ``weights download`` fetches from (one place, so a test can point it at a file)."""
    return weights.url


def cached_path(weights: models.WeightsEnum) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_url(weights)).name


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def published_hash(path: Path) -> str | None:
    """The SHA-256 prefix torchvision puts in a weights file's name, if there is one."""
    match = HASH_IN_NAME.search(path.name)
    return match.group(1) if match else None


def problem_with(path: Path) -> str | None:
    """Why the cached file at ``path`` cannot be trusted, or None when it can."""
    digest = file_sha256(path)
    sidecar = sidecar_of(path)
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text())["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None
        return None if recorded == digest else f"{path} differs from the digest in {sidecar.name}"
    published = published_hash(path)
    if published is None:
        return f"{path} has no hash in its name and no {SIDECAR_SUFFIX} sidecar"
    if not digest.startswith(published):
        return f"{path} does not match torchvision's hash {published} (a damaged file?)"
    return None


def write_project_weights(state_dict: dict[str, torch.Tensor], weights: Any) -> Path:
    """Put weights the project made itself in the cache under torchvision's name for
    ``weights``, with the sidecar that vouches for them (tests use it; so can a user who
    converted weights of their own)."""
    path = cached_path(weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    sidecar_of(path).write_text(json.dumps({"sha256": file_sha256(path), "weights": str(weights)}))
    return path


def download_command(task: str, model_type: str) -> str:
    return f"python -m trainer weights download --task {task} --model-type {model_type}"


def choose(
    setting: str, weights: models.WeightsEnum | None, settings: Settings, check_hash: bool = True
) -> LocalWeights | None:
    """The weights a training starts from under ``model.pretrained=setting``, or None.
    ``check_hash=False``: only whether they are there (the check before anything is billed;
    hashing the file is the operation's work, done once when it loads them)."""
    mode = pretrained_mode(setting)
    if mode == "false":
        return None
    constructor = settings.model.constructor
    command = download_command(settings.task.name, settings.model.type)
    if weights is None:
        if mode == "true":
            raise UserError(
                f"model.pretrained=true: torchvision has no weights for {constructor}; "
                "train it from scratch with model.pretrained=false"
            )
        log.info("model.pretrained=auto: torchvision has no weights for %s; training from "
                 "scratch", constructor)  # fmt: skip
        return None
    path = cached_path(weights)
    if not path.is_file():
        problem: str | None = f"{path} is not in the local torch hub cache"
    else:
        problem = problem_with(path) if check_hash else None
    if problem is None:
        return LocalWeights(str(weights), path)
    if mode == "true":
        raise UserError(f"model.pretrained=true: {problem}; get the weights with: {command}")
    log.warning("model.pretrained=auto: %s; training from scratch (get the weights with: %s)",
                problem, command)  # fmt: skip
    return None


def load_matching(network: nn.Module, weights: LocalWeights) -> nn.Module:
    """Load every tensor of ``weights`` whose name and shape the network shares; mark the
    parameters that came from them. Refuses weights that fit nothing (the wrong network)."""
    own = network.state_dict()
    matching = {
        key: value
        for key, value in weights.state_dict().items()
        if key in own and tuple(own[key].shape) == tuple(value.shape)
    }
    parameters = {name for name, _ in network.named_parameters()}
    loaded = parameters & set(matching)
    if not loaded:
        raise UserError(f"{weights.path} holds no tensor of this network; is it {weights.name}?")
    network.load_state_dict(matching, strict=False)
    setattr(network, PRETRAINED_NAMES, frozenset(loaded))
    log.info("pretrained: %s, %d of %d parameter tensors (the rest are for our labels)",
             weights.name, len(loaded), len(parameters))  # fmt: skip
    return network


def optimizer_settings(optimizer: OptimizerSettings) -> dict[str, Any]:
    """The module's optimizer arguments from ``optimizer.*`` (a config recorded before the
    fine-tuning keys existed is migrated to none: trainer/settings.py)."""
    return {
        "lr": optimizer.lr,
        "weight_decay": optimizer.weight_decay,
        "pretrained_lr_factor": optimizer.pretrained_lr_factor,
        "warmup_steps": optimizer.warmup_steps,
    }


class FineTuning(LightningModule):
    """What a LightningModule with a ``backbone`` needs to fine-tune it: AdamW with the
    pretrained parameters at ``pretrained_lr_factor`` times the rate of the fresh ones (the head
    learns from scratch, the features only need adjusting), a linear warm-up over the first
    ``warmup_steps`` steps (a fresh head's first large gradients would wreck pretrained
    features), and, where ``hold_pretrained_batch_norm`` (detectors, whose batches are a few
    images), the pretrained BatchNorm statistics kept as they are, as torchvision's pretrained
    detectors keep them. Trained from scratch, none of it applies: one group, no warm-up.

    Which parameters were pretrained goes into every checkpoint, so that a resumed training
    or one trained further builds the same optimizer groups whatever its own cache holds.
    """

    backbone: nn.Module  # the task's network, set by the module's __init__
    hold_pretrained_batch_norm = False
    # Set by the job when this training goes on from another model's checkpoint (a training
    # further): it warms up too, from the step it starts at. Its rate starts again at the full
    # rate for its own budget (optimizer.lr_schedule), after the base's last steps at a small
    # one; a warm-up is the usual way to restart AdamW at a high rate. (On the 10-image
    # validation split of tests/test_resume.py its effect is within the noise of a pass.)
    warm_restart = False
    _first_step: int | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        """The one optimizer ``configure_optimizers`` made, as the Trainer holds it."""
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list), "one optimizer"
        return optimizer.optimizer

    def pretrained_names(self) -> frozenset[str]:
        return getattr(self.backbone, PRETRAINED_NAMES, frozenset())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        names = self.pretrained_names()
        pretrained: list[nn.Parameter] = []
        fresh: list[nn.Parameter] = []
        for name, parameter in self.backbone.named_parameters():
            if parameter.requires_grad:
                (pretrained if name in names else fresh).append(parameter)
        groups: list[dict[str, Any]] = [{"params": fresh}]
        if pretrained:
            groups.append({"params": pretrained})
        for group, rate in zip(groups, self.group_rates(), strict=True):
            group["lr"] = rate
        return torch.optim.AdamW(
            groups, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"],
            fused=fused_adamw(self.device.type),
        )  # fmt: skip

    def group_rates(self) -> list[float]:
        """The configured rate of each optimizer group: the fresh layers', then (when there are
        any) the pretrained ones'."""
        lr = float(self.hparams["lr"])
        if not self.pretrained_names():
            return [lr]
        return [lr, lr * float(self.hparams["pretrained_lr_factor"])]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        steps = int(self.hparams["warmup_steps"])
        if self._first_step is None:
            self._first_step = self.global_step  # this fit's first step
        done = self.global_step - (self._first_step if self.warm_restart else 0)
        if (self.pretrained_names() or self.warm_restart) and done <= steps:
            for group in self.trainer.optimizers[0].param_groups:
                # The target rate is kept on the group, so the learning-rate drop (which
                # scales ``lr``) is left alone once the warm-up is over.
                group.setdefault("warmup_target_lr", group["lr"])
                group["lr"] = group["warmup_target_lr"] * min(1.0, (done + 1) / max(steps, 1))

    def train(self, mode: bool = True) -> Any:
        super().train(mode)
        if mode and self.hold_pretrained_batch_norm and self.pretrained_names():
            names = self.pretrained_names()
            for name, layer in self.backbone.named_modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm) and f"{name}.weight" in names:
                    layer.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[PRETRAINED_NAMES] = sorted(self.pretrained_names())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        names = checkpoint.get(PRETRAINED_NAMES)
        if isinstance(names, list):
            setattr(self.backbone, PRETRAINED_NAMES, frozenset(map(str, names)))
        # A saved optimizer's groups carry its kernel choice, which loading would bring back:
        # the device this training runs on chooses (a CPU training's checkpoint, trained
        # further on a GPU, must not clip gradients through a fused optimizer there).
        if self._trainer is None:  # loaded outside a training: no optimizer is built
            return
        fused = fused_adamw(self._trainer.strategy.root_device.type)
        for state in checkpoint.get("optimizer_states", []):
            for group in state.get("param_groups", []):
                group["fused"] = fused


def fused_adamw(device_type: str) -> bool:
    """Whether AdamW runs as one fused kernel: on the CPU, where torch's default loops over the
    parameters in Python (8 ms of a 32-image MobileNetV3-Small step on 2 cores, against 1.4 ms
    fused). On a GPU torch already defaults to its multi-tensor kernels, and Lightning refuses
    to clip gradients (detectors do) through a fused optimizer under mixed precision."""
    return device_type == "cpu"
