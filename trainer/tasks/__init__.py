"""What differs between tasks, behind one interface; everything else is one mechanism.

A task is one package here plus its configs, and nothing else names it:

- ``conf/task/<name>.yaml``: the ID prefix, the model metadata key, the monitored validation
  metric and the model lifespan;
- ``conf/task_model/<name>/<model type>.yaml``: each model type's network, input size and budget
  bounds (``default.yaml`` picks the task's default type);
- ``trainer/tasks/<name>/task.py``: ``TASK``, an object with every method of ``Task`` below;
- ``trainer/tasks/<name>/__init__.py``: optionally ``add_predict_options(parser)``, the task's own
  flags of the ``predict`` verb. It must not import torch: the CLI builds its parser from it.
- ``trainer/tasks/<name>/data.py``: ``DATASET_FORMAT``, how a dataset import reads the task's
  CSVs (trainer/data/dataset_rows.py's ``DatasetFormat``). It must not import torch either.

The training job (trainer/job/train.py), ``models evaluate``, ``predict``, ``models export`` and
the stored-model loader ask ``task_of(settings)`` for what they need. Budgets, checkpoints, resume,
cancel, the store and the CLI know nothing of tasks. This module imports no torch, so that the
CLI can read the task configs quickly.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from trainer import CONF_DIR
from trainer.data.prediction_inputs import SourcePolicy
from trainer.settings import ModelSettings, Settings

if TYPE_CHECKING:
    import numpy as np
    from torch import nn
    from torch.utils.data import DataLoader

    from trainer.data.dataset_rows import DatasetFormat
    from trainer.data.prediction import PredictionResult
    from trainer.store.evaluations import Evaluation


@dataclass
class Loaders:
    train: Iterable[Any]  # a DataLoader, or batches drawn from a cache (trainer/data/)
    val: Iterable[Any]
    test: DataLoader
    metrics: dict[str, float] = field(default_factory=dict)  # for metrics.json


@dataclass
class PredictRequest:
    """One ``predict`` call: the input rows (as ``read_prediction_input`` read them), where
    relative paths start from, the output folder, the verb's flags and a progress callback."""

    rows: list[Any]
    base: Path
    folder: Path
    options: Any  # the parsed flags: score_threshold, shard_size, workers and the task's own
    progress: Callable[[int, int], None] = lambda done, total: None
    # What a row may name (local files; URLs with --allow-remote), for the task's reader.
    sources: SourcePolicy = field(default_factory=SourcePolicy)


@dataclass
class Verification:
    """How an exported model compared with the trained one: figures for metadata.json, and
    what was wrong (None when it agrees)."""

    figures: dict[str, Any]
    problem: str | None = None


@dataclass
class ExportPlan:
    """What ``models export`` writes, feeds and checks, for one trained network.

    ``network`` is what gets exported (in eval mode, CPU); ``example`` one input batch of the
    right shape to trace it with; ``inputs`` real TEST inputs prepared as the task prepares
    them (a list of batches, each an array the exported model takes as it is); ``compare``
    judges the exported outputs against the network's, batch by batch (each a list of arrays,
    one per output); ``metadata`` says how to feed the package and what comes out.
    """

    network: nn.Module
    example: Any
    input_name: str
    output_names: list[str]
    inputs: list[np.ndarray]
    compare: Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], Verification]
    metadata: dict[str, Any]
    batch_free: bool = True  # False: the exported model takes one example at a time
    # torch.onnx's dynamo exporter cannot follow data-dependent shapes (a detector's NMS);
    # "torchscript" uses torch.onnx's TorchScript-based exporter instead.
    onnx_exporter: str = "dynamo"
    # "script" keeps control flow that tracing would freeze (a detector's variable box count).
    torchscript: str = "trace"


@dataclass(frozen=True)
class Decision:
    """What an int8 package is judged by (trainer/tflite.py's ``judge_int8``): what one output,
    a row of logits, decides; what that is called; and the names of its figures in
    metadata.json (agreement with the float model; float<accuracy> and int8<accuracy>)."""

    decide: Callable[[Any], Hashable]
    called: str  # "top label"
    measure: str  # "accuracy"
    agreement_figure: str  # "top1AgreementWithFloat"
    accuracy_figure: str  # "TestAccuracy"


TOP_LABEL = Decision(
    lambda logits: int(logits.argmax()), "top label", "accuracy", "top1AgreementWithFloat",
    "TestAccuracy",
)  # fmt: skip


@dataclass
class TfLitePlan:
    """What ``models export --format tflite`` converts, feeds and checks (trainer/tflite.py).

    ``network`` takes one input as the package does (batch 1, NHWC pixels); ``example`` is such
    an input; ``inputs`` are TEST inputs as arrays the package takes as they are, one a batch;
    ``reference(input)`` is what the trained model answers and ``postprocess(outputs)`` turns
    the package's raw outputs into the same form, which ``compare`` judges (as ExportPlan's);
    ``calibration`` are TRAIN inputs for int8, ``truth`` each TEST input's true ``decision``
    (int8's rule: its agreement with the float model and its accuracy); ``metadata`` says how to
    feed the package and read what comes out.
    """

    network: nn.Module
    example: Any
    inputs: list[np.ndarray]
    reference: Callable[[np.ndarray], list[np.ndarray]]
    compare: Callable[[list[list[np.ndarray]], list[list[np.ndarray]]], Verification]
    metadata: dict[str, Any]
    postprocess: Callable[[list[np.ndarray]], list[np.ndarray]] = lambda outputs: outputs
    calibration: list[np.ndarray] = field(default_factory=list)
    truth: list[Hashable] = field(default_factory=list)
    decision: Decision = TOP_LABEL


@dataclass
class OnlineModel:
    """What a deployed model runs (trainer/serving/): batch prediction's preprocessing and
    network, and AutoML's answers for one image at a time."""

    transform: Callable[[Any], Any]  # an RGB PIL image -> the network's input, as in batch
    outputs: Callable[[Any], list[Any]]  # a batch of inputs -> each image's output (NumPy)
    # An output and the request's params -> AutoML's AnnotationPayloads, best first.
    annotations: Callable[[Any, dict[str, float]], list[dict[str, Any]]]
    # An output -> the fields of AutoML Edge's TF Serving prediction (beside its "key").
    tf_serving: Callable[[Any], dict[str, Any]]
    params: dict[str, float]  # the params a PredictRequest may give, with their defaults


class Task(Protocol):
    """Every LightningModule holds its network as ``backbone``: checkpoints load alike."""

    # -- training ----------------------------------------------------------------------------

    def read_manifest(
        self, settings: Settings, for_training: bool = True, check_files: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Any:  # fmt: skip
        """The dataset of ``settings`` (the generated demo one when no path is given): an object
        with ``labels``, ``items``, ``split(name)``, ``fingerprint()``. ``check_files=False``
        reads the listing alone, every file taken as readable (the quick check before an
        operation opens); checking the files looks at ``should_stop`` as it goes and raises
        trainer.data.manifest.CheckStopped when it says so."""

    def describe(self, manifest: Any) -> str:
        """One line on the dataset: counts per split, what was skipped and why."""

    def loaders(self, manifest: Any, settings: Settings, job: Any) -> Loaders:
        """TRAIN, VALIDATE and TEST loaders; ``job`` has the budget meter and stop request
        for work that must be billed (building a cache)."""

    def typical_size(self, manifest: Any) -> tuple[int, int] | None:
        """The median (height, width) of the TRAIN images (a video's frames), from the headers
        of an even sample (trainer.data.input_size); None when none can be read."""

    def pretrained_weights(self, model: ModelSettings) -> Any:
        """torchvision's weights (a ``WeightsEnum``) that the model type's network starts from
        under ``model.pretrained``, or None where torchvision publishes none."""

    def network(self, settings: Settings, labels: list[str], pretrained: Any) -> nn.Module:
        """The model type's network for these labels: from scratch (``pretrained`` None) or
        from checked local weights (a ``trainer.tasks.pretrained.LocalWeights``)."""

    def module(self, network: nn.Module, labels: list[str], settings: Settings) -> Any:
        """The LightningModule that trains ``network``; it logs ``task.monitor``, keeps the
        TEST pass's outputs for ``evaluation`` and its duration as ``test_seconds``."""

    def test_metrics(self, results: dict[str, float]) -> dict[str, float]:
        """The TEST figures that metrics.json and the log report."""

    def evaluation(self, module: Any, manifest: Any, labels: list[str], model_name: str) -> Any:
        """The Evaluation (trainer.store.evaluations) of the TEST pass just run."""

    def example_input(self, loader: DataLoader) -> Any:
        """A small input batch for logging the network to MLflow (None: log without one)."""

    def serving(self, network: nn.Module) -> nn.Module:
        """The network as MLflow logs it for `mlflow models serve`: one tensor in, one out."""

    # -- a stored model ----------------------------------------------------------------------

    def evaluate_items(
        self, network: nn.Module, settings: Settings, items: list[Any], labels: list[str],
        model_name: str,
    ) -> Evaluation:  # fmt: skip
        """`models evaluate`: the evaluation of ``items`` by a stored network."""

    def read_prediction_input(self, path: Path, options: Any) -> list[Any]:
        """The rows of a `predict` input file, with the task's own flags checked; a malformed
        file or flag is a UserError, before the operation starts."""

    def predict(
        self, network: nn.Module, settings: Settings, labels: list[str], request: PredictRequest
    ) -> PredictionResult:
        """Write AutoML's batch-prediction files for ``request.rows`` into ``request.folder``;
        a bad row is an error record, never a stop."""

    def export_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any]
    ) -> ExportPlan:
        """How `models export` exports ``network`` and verifies it on ``items`` (TEST items;
        none for a latency measurement on ``example`` alone)."""

    def tflite_plan(
        self, network: nn.Module, settings: Settings, labels: list[str], items: list[Any],
        calibration: list[Any], quantize: str, options: dict[str, Any],
    ) -> TfLitePlan:  # fmt: skip
        """How `models export --format tflite` converts ``network``: verified on ``items``
        (TEST), int8 calibrated on ``calibration`` (TRAIN); ``options``: conf/export.yaml's
        ``tflite``. A network or quantization the converter cannot take is a UserError of one
        line naming the types that export."""

    def online(self, network: nn.Module, settings: Settings, labels: list[str]) -> OnlineModel:
        """What a deployed ``network`` runs; a task whose ``task.online_prediction`` is false
        (conf/task/) raises a UserError naming batch prediction."""


def default_task() -> str:
    """The task a training gets without ``task=``: conf/config.yaml's default."""
    import yaml

    defaults = yaml.safe_load((CONF_DIR / "config.yaml").read_text())["defaults"]
    return next(entry["task"] for entry in defaults if isinstance(entry, dict) and "task" in entry)


def task_configs() -> dict[str, dict[str, Any]]:
    """Every task's conf/task/<name>.yaml, by name (YAML only: no Hydra, no torch). Read once
    per process (`models list` asked once per model: 6,000 parses for 2,000 models); each call
    gets its own copy, so a caller that changes one changes no one else's."""
    return copy.deepcopy(_parsed_task_configs())


@functools.cache
def _parsed_task_configs() -> dict[str, dict[str, Any]]:
    import yaml

    found = {}
    for path in sorted((CONF_DIR / "task").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        found[config["name"]] = config
    return found


@functools.cache
def task_metadata_keys() -> Mapping[str, str]:
    """Each task's Model metadata key (``metadata_key`` of conf/task/<name>.yaml), by task name:
    what the lists' ``task=`` filter and a Model's task are read from."""
    configs = _parsed_task_configs()
    return MappingProxyType({name: config["metadata_key"] for name, config in configs.items()})


def task_name_of_model(model: dict[str, Any]) -> str:
    """The task of a Model resource, from its metadata key."""
    return next((name for name, key in task_metadata_keys().items() if key in model), "")


def task_of(settings: Settings) -> Task:
    """The task the settings name (conf/task/ and the config checks refuse unknown ones)."""
    return task_named(settings.task.name)


def task_named(name: str) -> Task:
    """The task of that name: one of conf/task/."""
    if name not in _parsed_task_configs():
        raise ValueError(f"no task {name!r}")
    return importlib.import_module(f"trainer.tasks.{name}.task").TASK


def dataset_format(name: str) -> DatasetFormat:
    """How a dataset of task ``name`` imports its rows: its light data module's
    ``DATASET_FORMAT``."""
    if name not in task_configs():
        raise ValueError(f"no task {name!r}")
    return importlib.import_module(f"trainer.tasks.{name}.data").DATASET_FORMAT


def split_loaders(manifest: Any, loader: Callable[[list[Any], bool], Any]) -> Loaders:
    """The TRAIN (``train=True``: shuffled, augmented), VALIDATE and TEST loaders of a
    manifest, made alike by ``loader(items, train)``."""
    from trainer.data.manifest import TEST, TRAIN, VALIDATE

    return Loaders(
        loader(manifest.split(TRAIN), True),
        loader(manifest.split(VALIDATE), False),
        loader(manifest.split(TEST), False),
    )


def add_predict_options(parser: Any) -> None:
    """Each task's own flags of the predict verb, from its light package module."""
    for name in _parsed_task_configs():
        add = getattr(importlib.import_module(f"trainer.tasks.{name}"), "add_predict_options", None)
        if add is not None:
            add(parser)
