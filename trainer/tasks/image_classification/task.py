"""Image classification: a folder per label or AutoML's CSV; a torchvision classifier."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.data import manifest as datasets
from trainer.data.images import LabelledImages, eval_transform, make_loader, make_loaders
from trainer.data.input_size import even_sample, median_size
from trainer.data.prediction import PredictionResult, predict_request, read_input_csv
from trainer.settings import ModelSettings, Settings
from trainer.store.evaluations import Evaluation
from trainer.tasks import ExportPlan, Loaders, OnlineModel, PredictRequest, TfLitePlan
from trainer.tasks.image_classification import export
from trainer.tasks.image_classification.demo import ensure_demo_dataset
from trainer.tasks.image_classification.evaluation import classification_evaluation, score_batches
from trainer.tasks.image_classification.module import ImageClassifier
from trainer.tasks.image_classification.networks import build_backbone
from trainer.tasks.image_classification.predict import (
    RESULTS_PREFIX,
    classification_online,
    classification_records,
    multilabel,
)
from trainer.tasks.pretrained import optimizer_settings, torchvision_weights

log = logging.getLogger("trainer")


class ImageClassification:
    # -- training ----------------------------------------------------------------------------

    def read_manifest(
        self, settings: Settings, for_training: bool = True, check_files: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> datasets.Manifest:  # fmt: skip
        path = settings.dataset.path or ensure_demo_dataset(settings.home)
        return datasets.read_dataset(
            path, for_training=for_training, check_files=check_files, should_stop=should_stop,
            classification_type=settings.dataset.classification_type,
        )  # fmt: skip

    def describe(self, manifest: datasets.Manifest) -> str:
        return datasets.describe(manifest)

    def loaders(self, manifest: datasets.Manifest, settings: Settings, job: Any) -> Loaders:
        # A decoded-image cache is built here when data.cache asks for one: billed like all work.
        loaders = make_loaders(
            manifest, settings, job.meter.remaining_seconds(), lambda: job.stop.reason is not None
        )
        seconds = loaders.cache.build_seconds
        if seconds:
            log.info("image cache: %.1f s (%.1f milli-node-hours) of this training's cost went "
                     "to building it", seconds, seconds * job.nodes / 3.6)  # fmt: skip
        # 1 when TRAIN batches are drawn on the device (data.cache_on_device), 0 otherwise.
        on_device = float(getattr(loaders.train, "path", "") == "device")
        metrics = {"cacheBuildSeconds": round(seconds, 3), "cacheOnDevice": on_device}
        return Loaders(loaders.train, loaders.val, loaders.test, metrics)

    def typical_size(self, manifest: Any) -> tuple[int, int] | None:
        return median_size(item.path for item in even_sample(manifest.split(datasets.TRAIN)))

    def pretrained_weights(self, model: ModelSettings) -> Any:
        return torchvision_weights(model.constructor)

    def network(self, settings: Settings, labels: list[str], pretrained: Any) -> nn.Module:
        return build_backbone(settings.model.constructor, len(labels), pretrained)

    def module(self, network: nn.Module, labels: list[str], settings: Settings) -> Any:
        return ImageClassifier(network, len(labels), multilabel=multilabel(settings),
                               **optimizer_settings(settings.optimizer))  # fmt: skip

    def test_metrics(self, results: dict[str, float]) -> dict[str, float]:
        names = ("test_auprc", "test_exact_match") if "test_auprc" in results else (
            "test_accuracy",)  # fmt: skip
        return {name: results[name] for name in (*names, "test_loss")}

    def evaluation(
        self, module: Any, manifest: datasets.Manifest, labels: list[str], model_name: str
    ) -> Evaluation:
        scores = torch.cat(module.test_scores).numpy()
        targets = torch.cat(module.test_targets).numpy()
        items = manifest.split(datasets.TEST)  # the TEST loader's order: it does not shuffle
        return classification_evaluation(model_name, scores, targets, labels, items)

    def example_input(self, loader: DataLoader) -> np.ndarray:
        return next(iter(loader))[0][:2].float().numpy()

    def serving(self, network: nn.Module) -> nn.Module:
        return network

    # -- a stored model ----------------------------------------------------------------------

    def evaluate_items(
        self, network: nn.Module, settings: Settings, items: list[datasets.Item],
        labels: list[str], model_name: str,
    ) -> Evaluation:  # fmt: skip
        images = LabelledImages(items, labels, _eval_transform(settings), multilabel(settings))
        scores, targets = score_batches(network, make_loader(images, 64, 0, False, 0),
                                        multilabel(settings))  # fmt: skip
        return classification_evaluation(model_name, scores, targets, labels, items)

    def read_prediction_input(self, path: Path, options: Any) -> list[str]:
        return read_input_csv(path)

    def predict(
        self, network: nn.Module, settings: Settings, labels: list[str], request: PredictRequest
    ) -> PredictionResult:
        threshold = request.options.score_threshold
        records = classification_records(network, labels, threshold, multilabel(settings))
        return predict_request(records, _eval_transform(settings), RESULTS_PREFIX, request)

    def online(self, network: nn.Module, settings: Settings, labels: list[str]) -> OnlineModel:
        return classification_online(
            network, labels, _eval_transform(settings), multilabel(settings)
        )

    def export_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any]
    ) -> ExportPlan:
        return export.export_plan(network, settings, labels, items)

    def tflite_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any],
        calibration: list[Any], quantize: str, options: dict[str, Any],
    ) -> TfLitePlan:  # fmt: skip
        return export.tflite_plan(network, settings, labels, items, calibration)


def _eval_transform(settings: Settings) -> Any:
    return eval_transform(settings.model.size, settings.data.mean, settings.data.std)


TASK = ImageClassification()
