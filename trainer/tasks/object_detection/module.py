"""The LightningModule for object detection, interchangeable with the image classifier.

Same constructor arguments (network, number of labels, learning rate, weight decay), optimizer
and learning-rate handling on resume, so the training job can swap one for the other. It logs
``train_loss`` (the sum of the detector's losses), ``val_map`` and ``val_map_50`` per epoch, and
``test_map``, ``test_map_50`` and ``test_map_75``; the TEST pass keeps every image's predictions
and true boxes (normalized to [0, 1], labels 0-based) for evaluation/detection.py.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from trainer.tasks.pretrained import FineTuning

Batch = tuple[list[torch.Tensor], list[dict]]
Detections = dict[str, torch.Tensor]


class ObjectDetector(FineTuning, LightningModule):
    hold_pretrained_batch_norm = True  # a few images a batch: too few for batch statistics

    def __init__(
        self,
        detector: nn.Module,
        num_classes: int,
        lr: float,
        weight_decay: float,
        max_grad_norm: float = 10.0,
        pretrained_lr_factor: float = 1.0,
        warmup_steps: int = 0,
    ) -> None:
        """``num_classes`` is the number of labels (the detector has one more: background)."""
        super().__init__()
        # As in ImageClassifier: the resolved config is logged by the store, not here.
        self.save_hyperparameters(ignore=["detector"], logger=False)
        # Named as the classifier's network, so that checkpoints keep the same "backbone."
        # key prefix (trainer/stored_model.py loads the network from them) and the job's
        # `module.backbone` means the whole network for either task.
        self.backbone = detector
        # pycocotools, as evaluation/detection.py: the logged figures and the evaluation agree.
        self.val_map = MeanAveragePrecision(box_format="xyxy", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", backend="pycocotools")
        self.test_predictions: list[Detections] = []
        self.test_targets: list[Detections] = []
        self.test_seconds = 0.0

    def forward(self, images: list[torch.Tensor]) -> list[Detections]:
        return self.backbone(images)

    def detect(self, images: list[torch.Tensor]) -> list[Detections]:
        """Detections in float32, even under the bf16 autocast that trains on GPUs.

        torchvision decodes boxes in the dtype of the regression output: under bf16 they land
        on bfloat16's grid, 2 pixels wide near pixel 300, which costs mAP at strict IoU. Weights
        stay float32 in mixed precision, so evaluating without autocast is exact.
        """
        with torch.autocast(device_type=self.device.type, enabled=False):
            outputs = self.backbone([image.float() for image in images])
        return [{key: _as_float(value) for key, value in out.items()} for out in outputs]

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.backbone(images, [_plain(t) for t in targets])
        loss = sum(losses.values())
        # Per epoch only, as the classifier does: a store write per step shows on small steps.
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(self.detect(images), [_plain(t) for t in targets])

    def on_validation_epoch_end(self) -> None:
        self._log_map("val", self.val_map, ("map", "map_50"))

    def on_test_epoch_start(self) -> None:
        self.test_predictions, self.test_targets = [], []
        self._test_started = time.monotonic()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        outputs = self.detect(images)
        self.test_map.update(outputs, [_plain(t) for t in targets])
        for image, output, target in zip(images, outputs, targets, strict=True):
            height, width = image.shape[-2:]
            self.test_predictions.append(normalized_detections(output, height, width))
            self.test_targets.append(normalized_detections(_plain(target), height, width))

    def on_test_epoch_end(self) -> None:
        self.test_seconds = time.monotonic() - self._test_started
        self._log_map("test", self.test_map, ("map", "map_50", "map_75"))

    def _log_map(self, stage: str, metric: MeanAveragePrecision, keys: tuple[str, ...]) -> None:
        # compute() gathers every rank's boxes, so all ranks log the same figures.
        results = metric.compute()
        metric.reset()
        for key in keys:
            # -1 means no true box at all; early stopping and the budget want a number.
            value = max(float(results[key]), 0.0)
            self.log(f"{stage}_{key}", value, sync_dist=False)

    def on_train_start(self) -> None:
        # As in ImageClassifier: the config's learning rate wins over a restored checkpoint's.
        for group in self.optimizer().param_groups:
            group["lr"], group["weight_decay"] = self.hparams["lr"], self.hparams["weight_decay"]

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Detectors trained from scratch see rare huge box-regression gradients in their first
        # steps; a norm clip keeps one bad batch from wrecking the weights. The Trainer's own
        # setting, when given, wins.
        self.clip_gradients(
            optimizer,
            gradient_clip_val=gradient_clip_val or self.hparams["max_grad_norm"],
            gradient_clip_algorithm=gradient_clip_algorithm or "norm",
        )


class ServingDetector(nn.Module):
    """A detector with one tensor in and one out, as `mlflow models serve` and MLflow's pyfunc
    need (a torchvision detector returns a list of dicts): images (B, 3, H, W) in [0, 1] in,
    (B, max_detections, 6) out, each row x_min, y_min, x_max, y_max (in [0, 1]), score, label
    index (0-based), best first; unused rows are -1."""

    def __init__(self, detector: nn.Module, max_detections: int = 100) -> None:
        super().__init__()
        self.detector = detector
        self.max_detections = max_detections

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()  # served JSON arrives as float64
        height, width = images.shape[-2:]
        rows = torch.full((len(images), self.max_detections, 6), -1.0)
        if torch.jit.is_scripting():
            # Scripted for MLflow: served on the CPU in float32, no autocast to turn off; a
            # scripted detector returns (losses, detections).
            outputs = self.detector(list(images))[1]
        else:
            with torch.autocast(device_type=images.device.type, enabled=False):  # see detect()
                outputs = self.detector(list(images))
        for index, output in enumerate(outputs):
            found = normalized_detections(output, height, width)
            order = found["scores"].argsort(descending=True)[: self.max_detections]
            count = len(order)
            rows[index, :count, :4] = found["boxes"][order]
            rows[index, :count, 4] = found["scores"][order]
            rows[index, :count, 5] = found["labels"][order].float()
        return rows


def normalized_detections(output: Detections, height: int, width: int) -> Detections:
    """A detector's output (or a target) in [0, 1] coordinates with 0-based labels, on the CPU:
    what evaluation/detection.py and trainer/tasks/object_detection/predict.py take."""
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = output["boxes"].detach().float().cpu().reshape(-1, 4) / scale
    result = {"boxes": boxes.clamp(0.0, 1.0), "labels": output["labels"].detach().cpu() - 1}
    if "scores" in output:
        result["scores"] = output["scores"].detach().float().cpu()
    return result


def _as_float(value: torch.Tensor) -> torch.Tensor:
    return value.float() if value.is_floating_point() else value


def _plain(target: dict) -> dict[str, torch.Tensor]:
    """Boxes as a plain tensor: torchmetrics and the detectors' losses want nothing fancier."""
    return {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}
