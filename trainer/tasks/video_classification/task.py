"""Video classification: AutoML's video CSV of labelled segments; clips from each segment."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from trainer.data.input_size import even_sample, median_size
from trainer.data.manifest import TRAIN
from trainer.data.prediction import PredictionResult
from trainer.errors import UserError
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
from trainer.tasks.image_classification.evaluation import classification_evaluation, score_batches
from trainer.tasks.pretrained import optimizer_settings
from trainer.tasks.video_classification import export
from trainer.tasks.video_classification.clips import ClipSpec, VideoClips, make_clip_loader
from trainer.tasks.video_classification.data import (
    Segment,
    VideoManifest,
    describe,
    frame_size,
    read_video_dataset,
)
from trainer.tasks.video_classification.demo import ensure_demo_videos
from trainer.tasks.video_classification.module import VideoClassifier
from trainer.tasks.video_classification.networks import build_video_backbone, pretrained_weights
from trainer.tasks.video_classification.predict import (
    PredictOptions,
    predict_videos,
    read_prediction_csv,
)

DEMO_VIDEOS_PER_LABEL = 24
ONLINE_REFUSED = (
    "video models predict in batch only, as AutoML Video's did: use batch prediction "
    "(python -m trainer predict, or the API's batchPredict)"
)


def clip_spec(settings: Settings) -> ClipSpec:
    model, data = settings.model, settings.data
    if model.frames_per_clip is None or model.frame_stride is None:
        raise UserError(f"model type {model.type} sets no model.frames_per_clip or frame_stride")
    return ClipSpec(model.frames_per_clip, model.frame_stride, model.size, data.mean, data.std)


def clip_loader(
    segments: list[Segment], labels: list[str], settings: Settings, train: bool
) -> DataLoader:
    data = settings.data
    clips = VideoClips(segments, labels, clip_spec(settings), train, 1)  # one clip a segment
    return make_clip_loader(clips, data.batch_size, data.num_workers, train, settings.seed)


class VideoClassification:
    # -- training ----------------------------------------------------------------------------

    def read_manifest(
        self, settings: Settings, for_training: bool = True, check_files: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> VideoManifest:  # fmt: skip
        # A video dataset is always checked as for training: its splits are by video.
        path = settings.dataset.path or ensure_demo_videos(settings.home, DEMO_VIDEOS_PER_LABEL)
        return read_video_dataset(path, check_files=check_files, should_stop=should_stop)

    def describe(self, manifest: VideoManifest) -> str:
        return describe(manifest)

    def loaders(self, manifest: VideoManifest, settings: Settings, job: Any) -> Loaders:
        return split_loaders(
            manifest,
            lambda segments, train: clip_loader(segments, manifest.labels, settings, train),
        )

    def typical_size(self, manifest: Any) -> tuple[int, int] | None:
        return median_size(
            even_sample(sorted({s.path for s in manifest.split(TRAIN)})), size_of=frame_size
        )

    def pretrained_weights(self, model: ModelSettings) -> Any:
        return pretrained_weights(model.constructor)

    def network(self, settings: Settings, labels: list[str], pretrained: Any) -> nn.Module:
        return build_video_backbone(settings.model.constructor, len(labels), pretrained)

    def module(self, network: nn.Module, labels: list[str], settings: Settings) -> Any:
        return VideoClassifier(network, len(labels), **optimizer_settings(settings.optimizer))

    def test_metrics(self, results: dict[str, float]) -> dict[str, float]:
        return {"test_accuracy": results["test_accuracy"], "test_loss": results["test_loss"]}

    def evaluation(
        self, module: Any, manifest: VideoManifest, labels: list[str], model_name: str
    ) -> Evaluation:
        scores = torch.cat(module.test_scores).numpy()
        targets = torch.cat(module.test_targets).numpy()
        return classification_evaluation(model_name, scores, targets, labels)

    def example_input(self, loader: DataLoader) -> Any:
        batch = next((b for b in loader if b is not None), None)
        return None if batch is None else batch[0][:2].float().numpy()

    def serving(self, network: nn.Module) -> nn.Module:
        return network

    # -- a stored model ----------------------------------------------------------------------

    def evaluate_items(
        self, network: nn.Module, settings: Settings, items: list[Segment],
        labels: list[str], model_name: str,
    ) -> Evaluation:  # fmt: skip
        scores, targets = score_batches(
            VideoClassifier(network, len(labels), 0.0, 0.0).eval(),
            clip_loader(items, labels, settings, train=False),
        )
        return classification_evaluation(model_name, scores, targets, labels)

    def read_prediction_input(self, path: Path, options: Any) -> list[Any]:
        return read_prediction_csv(path)

    def predict(
        self, network: nn.Module, settings: Settings, labels: list[str], request: PredictRequest
    ) -> PredictionResult:
        flags = request.options
        options = PredictOptions(
            segment_classification=flags.segment_classification,
            shot_classification=flags.shot_classification,
            one_second_interval_classification=flags.one_second_interval_classification,
            score_threshold=flags.score_threshold,
        )

        def probabilities(clips: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return network(clips).float().softmax(dim=1)

        result = predict_videos(
            request.rows, request.base, probabilities, labels, clip_spec(settings), request.folder,
            options, flags.workers, request.progress, request.sources,
        )  # fmt: skip
        files = [result.csv_path, *result.json_files]
        return PredictionResult(
            request.folder, result.predicted, result.failed, files, [], result.seconds,
            result.partial_failures,
        )  # fmt: skip

    def online(self, network: nn.Module, settings: Settings, labels: list[str]) -> OnlineModel:
        raise UserError(ONLINE_REFUSED)

    def export_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any]
    ) -> ExportPlan:
        return export.export_plan(network, clip_spec(settings), items)

    def tflite_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any],
        calibration: list[Any], quantize: str, options: dict[str, Any],
    ) -> TfLitePlan:  # fmt: skip
        return export.tflite_plan(network, clip_spec(settings), items, quantize)


TASK = VideoClassification()
