"""Object detection: AutoML's detection CSV (boxes in [0, 1]); a torchvision detector."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.data.input_size import even_sample, median_size
from trainer.data.manifest import TEST, TRAIN
from trainer.data.prediction import PredictionResult, predict_request, read_input_csv
from trainer.settings import ModelSettings, Settings
from trainer.store.evaluations import Evaluation
from trainer.tasks import (
    ExportPlan,
    Loaders,
    OnlineModel,
    PredictRequest,
    TfLitePlan,
    split_loaders,
)
from trainer.tasks.object_detection import export
from trainer.tasks.object_detection.data import (
    DetectionItem,
    DetectionManifest,
    describe,
    read_detection_dataset,
)
from trainer.tasks.object_detection.demo import ensure_demo_detection_dataset
from trainer.tasks.object_detection.evaluation import detection_evaluation
from trainer.tasks.object_detection.images import (
    DetectionImages,
    detection_eval_transform,
    detection_train_transform,
    make_detection_loader,
)
from trainer.tasks.object_detection.module import (
    ObjectDetector,
    ServingDetector,
    normalized_detections,
)
from trainer.tasks.object_detection.networks import build_detector
from trainer.tasks.object_detection.predict import (
    OUTPUT_PREFIX,
    check_detection_options,
    detection_online,
    detection_records,
)
from trainer.tasks.pretrained import optimizer_settings, torchvision_weights


def detection_loader(
    items: list[DetectionItem], labels: list[str], settings: Settings, train: bool
) -> DataLoader:
    size, data = settings.model.size, settings.data
    transform = (
        detection_train_transform(size, data.horizontal_flip)
        if train
        else detection_eval_transform(size)
    )
    images = DetectionImages(items, labels, transform)
    return make_detection_loader(images, data.batch_size, data.num_workers, train, settings.seed)


class ObjectDetection:
    # -- training ----------------------------------------------------------------------------

    def read_manifest(
        self, settings: Settings, for_training: bool = True, check_files: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> DetectionManifest:  # fmt: skip
        path = settings.dataset.path or ensure_demo_detection_dataset(settings.home)
        return read_detection_dataset(
            path, for_training=for_training, check_files=check_files, should_stop=should_stop
        )

    def describe(self, manifest: DetectionManifest) -> str:
        return describe(manifest)

    def loaders(self, manifest: DetectionManifest, settings: Settings, job: Any) -> Loaders:
        return split_loaders(
            manifest, lambda items, train: detection_loader(items, manifest.labels, settings, train)
        )

    def typical_size(self, manifest: Any) -> tuple[int, int] | None:
        return median_size(item.path for item in even_sample(manifest.split(TRAIN)))

    def pretrained_weights(self, model: ModelSettings) -> Any:
        return torchvision_weights(model.constructor)

    def network(self, settings: Settings, labels: list[str], pretrained: Any) -> nn.Module:
        model, data = settings.model, settings.data
        return build_detector(
            model.constructor, len(labels), model.size, pretrained, data.mean, data.std
        )

    def module(self, network: nn.Module, labels: list[str], settings: Settings) -> Any:
        return ObjectDetector(network, len(labels), **optimizer_settings(settings.optimizer))

    def test_metrics(self, results: dict[str, float]) -> dict[str, float]:
        return {key: results[key] for key in ("test_map", "test_map_50", "test_map_75")}

    def evaluation(
        self, module: Any, manifest: DetectionManifest, labels: list[str], model_name: str
    ) -> Evaluation:
        items = manifest.split(TEST)  # the TEST loader's order: it does not shuffle
        return detection_evaluation(
            model_name, module.test_predictions, module.test_targets, labels, items
        )

    def example_input(self, loader: DataLoader) -> Any:
        images, _ = next(iter(loader))
        return torch.stack(images[:2]).numpy()  # resized alike: they stack

    def serving(self, network: nn.Module) -> nn.Module:
        """One tensor in, one out, as MLflow's pyfunc serving needs; scripted, since
        torch.export cannot follow the detector's data-dependent NMS (pt2 is not possible)."""
        return torch.jit.script(ServingDetector(network))

    # -- a stored model ----------------------------------------------------------------------

    def evaluate_items(
        self, network: nn.Module, settings: Settings, items: list[DetectionItem],
        labels: list[str], model_name: str,
    ) -> Evaluation:  # fmt: skip
        predictions, truths = [], []
        network.eval()
        with torch.inference_mode():
            for images, targets in detection_loader(items, labels, settings, train=False):
                for image, output, target in zip(images, network(images), targets, strict=True):
                    height, width = image.shape[-2:]
                    predictions.append(normalized_detections(output, height, width))
                    truths.append(normalized_detections(target, height, width))
        return detection_evaluation(model_name, predictions, truths, labels, items)

    def read_prediction_input(self, path: Path, options: Any) -> list[str]:
        check_detection_options(options.score_threshold, options.max_bounding_box_count)
        return read_input_csv(path)

    def predict(
        self, network: nn.Module, settings: Settings, labels: list[str], request: PredictRequest
    ) -> PredictionResult:
        options = request.options
        records = detection_records(
            network, labels, options.score_threshold, options.max_bounding_box_count
        )
        transform = detection_eval_transform(settings.model.size)
        result = predict_request(records, transform, OUTPUT_PREFIX, request)
        # AutoML's detection BatchPredictResult says how many boxes an image could get.
        result.response_metadata = {"max_bounding_box_count": str(options.max_bounding_box_count)}
        return result

    def online(self, network: nn.Module, settings: Settings, labels: list[str]) -> OnlineModel:
        return detection_online(network, labels, detection_eval_transform(settings.model.size))

    def export_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any]
    ) -> ExportPlan:
        return export.export_plan(network, settings, labels, items)

    def tflite_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any],
        calibration: list[Any], quantize: str, options: dict[str, Any],
    ) -> TfLitePlan:  # fmt: skip
        from trainer.tasks.object_detection import tflite

        exports = options["detection_constructors"]
        return tflite.tflite_plan(network, settings, items, quantize, exports)


TASK = ObjectDetection()
