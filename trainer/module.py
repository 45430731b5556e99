"""The LightningModule for image classification."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy


class ImageClassifier(LightningModule):
    def __init__(
        self, backbone: nn.Module, num_classes: int, lr: float, weight_decay: float
    ) -> None:
        super().__init__()
        # The resolved config is logged to MLflow by the store; logging hyperparameters again would
        # clash with a resumed operation that changes its learning rate.
        self.save_hyperparameters(ignore=["backbone"], logger=False)
        self.backbone = backbone
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, targets = batch
        loss = F.cross_entropy(self(images), targets)
        # Per epoch only: logging every step costs a store write per log interval, which shows
        # in benchmarks/overhead.py on small CPU steps.
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def _evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        images, targets = batch
        logits = self(images)
        accuracy(logits, targets)
        size = len(targets)
        self.log(f"{stage}_loss", F.cross_entropy(logits, targets), batch_size=size, sync_dist=True)
        self.log(f"{stage}_accuracy", accuracy, batch_size=size)

    def on_train_start(self) -> None:
        # A restored checkpoint brings its optimizer's learning rate; the config's value wins, so
        # that a resumed operation can change it.
        for group in self.optimizers().optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.hparams.lr, self.hparams.weight_decay

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
