"""The LightningModule for image classification.

What it does on the device beyond the model, it learns from its training data set's
``device_plan`` when training starts: augmenting cached uint8 batches (``device_augment``),
channels_last, and ``torch.compile`` of the training forward pass. Without a plan it trains on
the batches as they come, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
)

from budgets.callback import BudgetStopping
from budgets.schedule import FACTOR as BUDGET_LR_FACTOR
from trainer.data.device_augment import DevicePlan
from trainer.tasks.image_classification.predict import label_scores
from trainer.tasks.pretrained import FineTuning

log = logging.getLogger("trainer")


def _metrics(num_classes: int, multilabel: bool) -> dict[str, Metric]:
    """What a validation or TEST pass logs besides the loss, as ``<stage>_<name>``."""
    if multilabel:
        return {
            "auprc": MultilabelAveragePrecision(num_labels=num_classes, average="micro"),
            "exact_match": MultilabelExactMatch(num_labels=num_classes),
        }
    return {"accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro")}


class ImageClassifier(FineTuning, LightningModule):
    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        lr: float,
        weight_decay: float,
        pretrained_lr_factor: float = 1.0,
        warmup_steps: int = 0,
        multilabel: bool = False,
    ) -> None:
        super().__init__()
        # The resolved config is logged to MLflow by the store; logging hyperparameters again would
        # clash with a resumed operation that changes its learning rate.
        self.save_hyperparameters(ignore=["backbone"], logger=False)
        self.backbone = backbone
        self.multilabel = multilabel
        # A MULTILABEL model scores each label on its own (a sigmoid each, binary cross-entropy)
        # and is judged by the micro-averaged average precision, as AutoML judged it, and by how
        # many images get exactly their set of labels at a score threshold of 0.5.
        self.val_metrics, self.test_metrics = (
            nn.ModuleDict(_metrics(num_classes, multilabel)) for _ in range(2)
        )
        # The TEST pass keeps every example's scores for the evaluation resources, and its
        # duration, decoding included, for the model's nodeQps.
        self.test_scores: list[torch.Tensor] = []
        self.test_targets: list[torch.Tensor] = []
        self.test_seconds = 0.0
        self._plan = DevicePlan()
        # The compiled backbone, kept out of the module's children so that checkpoints keep
        # their keys; evaluation stays eager (see _compile_within_budget).
        self._compiled: nn.Module | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        images, targets = batch
        logits = self(images) if self._compiled is None else self._compiled(images)
        loss = self.loss(logits, targets)
        # Per epoch only: logging every step costs a store write per log interval, which shows
        # in benchmarks/overhead.py on small CPU steps.
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits, targets)
        return F.cross_entropy(logits, targets)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "test", self.test_metrics)
        self.test_scores.append(label_scores(logits, self.multilabel).cpu())
        self.test_targets.append(batch[1].cpu())

    def on_test_epoch_start(self) -> None:
        self.test_scores, self.test_targets = [], []
        self._test_started = time.monotonic()

    def on_test_epoch_end(self) -> None:
        self.test_seconds = time.monotonic() - self._test_started

    def _evaluate(self, batch, stage: str, metrics: nn.ModuleDict) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        size = len(targets)
        self.log(f"{stage}_loss", self.loss(logits, targets), batch_size=size, sync_dist=True)
        for name, metric in metrics.items():
            assert isinstance(metric, Metric)
            metric(logits, targets.long() if self.multilabel else targets)
            self.log(f"{stage}_{name}", metric, batch_size=size)
        return logits

    def on_train_start(self) -> None:
        # A restored checkpoint brings its optimizer's learning rate; the config's value wins, so
        # that a resumed operation can change it.
        groups = self.optimizer().param_groups
        for group, rate in zip(groups, self.group_rates(), strict=True):
            group["lr"], group["weight_decay"] = rate, self.hparams["weight_decay"]
            group.pop("warmup_target_lr", None)
            group.pop(BUDGET_LR_FACTOR, None)  # the rate set here is undecayed
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        self._plan = getattr(dataset, "device_plan", None) or DevicePlan()
        if self._plan.channels_last:
            # In place: the optimizer keeps the same parameters.
            self.to(memory_format=torch.channels_last)
        if self._plan.compile and self._compiled is None:
            self._compile_within_budget()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A cached training batch arrives as uint8: crop, flip and normalize it here."""
        if not isinstance(batch, (tuple, list)) or not isinstance(batch[0], torch.Tensor):
            return batch
        images, *rest = batch
        if images.dtype == torch.uint8 and self._plan.augment is not None:
            targets, source_hw = rest
            images, rest = self._plan.augment(images, source_hw), [targets]
        if self._plan.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return (images, *rest)

    def _compile_within_budget(self) -> None:
        """Compile the training forward and backward before the first step, if the budget allows.

        Compiling takes tens of seconds, once. Done inside the first step, it would make that
        step look like every step to the budget callback, which would stop training early;
        done here, it is billed like all work (the meter runs) and the callback's check before
        the first step runs again afterwards. It needs ``compile_reserve_seconds`` of budget
        beyond a first step's reserve, or training goes on eagerly. Evaluation is not
        compiled: a first validation pass that compiles would look as slow to the budget.
        """
        trainer, plan = self.trainer, self._plan
        callbacks = getattr(trainer, "callbacks", [])  # set on the Trainer, not declared there
        budget = next((c for c in callbacks if isinstance(c, BudgetStopping)), None)
        fits = True
        if budget is not None:
            val_batches = int(sum(n for n in trainer.num_val_batches if n != float("inf")))
            fits = budget.meter.fits(
                plan.compile_reserve_seconds + budget.reserve_after_step(val_batches)
            )
        # Every rank compiles, or none: the callback's check below is collective.
        if not trainer.strategy.reduce_boolean_decision(fits, all=True):
            log.warning(
                "trainer.compile: skipped, the budget left cannot also cover a compile "
                "(trainer.compile_reserve_seconds=%s); training eagerly",
                plan.compile_reserve_seconds,
            )
            return
        started = time.monotonic()
        compiled = torch.compile(self.backbone)
        self._warm_up(compiled)
        object.__setattr__(self, "_compiled", compiled)  # not a child module: see __init__
        log.info("trainer.compile: compiled in %.1f s", time.monotonic() - started)
        if budget is not None:
            budget.on_train_start(trainer, self)

    def _warm_up(self, compiled: Callable[..., Any]) -> None:
        """One forward and backward pass on a batch of the training shape, leaving no trace."""
        plan = self._plan
        images = torch.randn(plan.batch_size, 3, *plan.input_size, device=self.device)
        if plan.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        buffers = {name: b.detach().clone() for name, b in self.backbone.named_buffers()}
        with self.trainer.precision_plugin.forward_context():
            loss = compiled(images).float().mean()
        loss.backward()
        self.zero_grad(set_to_none=True)
        with torch.no_grad():  # batch-norm statistics as they were
            for name, buffer in self.backbone.named_buffers():
                buffer.copy_(buffers[name])
