"""What differs between tasks, behind one interface; everything else is one mechanism.

The training job (trainer/job/train.py), `models evaluate`, `predict` and the stored-model loader
ask the task of the config (``cfg["task"]["name"]``) for its data, network, LightningModule and
evaluation. Budgets, checkpoints, resume, cancel, the store and the CLI know nothing of tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the CLI and the manifest readers import this package without torch
    from torch import nn
    from torch.utils.data import DataLoader


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    metrics: dict[str, float] = field(default_factory=dict)  # for metrics.json


class Task(Protocol):
    """Every LightningModule holds its network as ``backbone``: checkpoints load alike."""

    def read_manifest(self, cfg: dict[str, Any], for_training: bool = True) -> Any:
        """The dataset of ``cfg`` (the generated demo one when no path is given): an object
        with ``labels``, ``split(name)``, ``fingerprint()``."""

    def describe(self, manifest: Any) -> str: ...

    def loaders(self, manifest: Any, cfg: dict[str, Any], job: Any) -> Loaders: ...

    def network(self, cfg: dict[str, Any], labels: list[str], pretrained: bool) -> nn.Module: ...

    def module(self, network: nn.Module, labels: list[str], cfg: dict[str, Any]) -> Any: ...

    def test_metrics(self, results: dict[str, float]) -> dict[str, float]:
        """The TEST figures that metrics.json and the log report."""

    def evaluation(self, module: Any, manifest: Any, labels: list[str], model_name: str) -> Any:
        """The evaluation (trainer.evaluate.Evaluation) of the TEST pass just run."""

    def evaluate_items(
        self, network: nn.Module, cfg: dict[str, Any], items: list[Any], labels: list[str],
        model_name: str,
    ) -> Any:  # fmt: skip
        """`models evaluate`: the evaluation of ``items`` by a stored network."""

    def example_input(self, loader: DataLoader) -> Any:
        """A small input batch for logging the network to MLflow (None: log without one)."""

    def serving(self, network: nn.Module) -> nn.Module:
        """The network as MLflow logs it for `mlflow models serve`."""


def task_of(cfg: dict[str, Any]) -> Task:
    name = cfg["task"]["name"]
    if name == "image_classification":
        from trainer.tasks.image_classification.task import ImageClassification

        return ImageClassification()
    if name == "object_detection":
        from trainer.tasks.object_detection.task import ObjectDetection

        return ObjectDetection()
    if name == "video_classification":
        from trainer.tasks.video_classification.task import VideoClassification

        return VideoClassification()
    raise ValueError(f"no task {name!r}")  # conf/task/ and settings.py refuse it earlier
