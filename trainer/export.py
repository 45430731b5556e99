"""Edge export: an ONNX or TorchScript package that runs without this project, verified and timed.

A package is written aside and renamed into place only once the exported model has given the
trained model's answers on real TEST images (largest absolute difference under the tolerance),
so a failed export leaves nothing behind.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.data.manifest import TEST
from trainer.errors import UserError
from trainer.store.resources import write_json_atomic
from trainer.stored_model import TrainedModel, load_network, test_images

log = logging.getLogger("trainer")

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
TOLERANCE = 1e-4  # float32 classification logits
LATENCY_RUNS, WARMUP_RUNS = 50, 10
RESIZE_RULE = (
    "resize the whole image to input_size (bilinear, antialiased; no crop), scale to [0, 1], "
    "then normalize each channel: (x - mean) / std"
)


class ExportFailed(UserError):
    """The exported model did not give the trained model's answers; nothing was kept."""


def write_model(network: nn.Module, fmt: str, path: Path, example: torch.Tensor) -> str:
    """Write the network; return what produced it (opset or torch version)."""
    if fmt == "onnx":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(
            network,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
        program.save(str(path), external_data=False)
        import onnx

        return (
            f"onnx opset {onnx.load(str(path), load_external_data=False).opset_import[0].version}"
        )
    traced = torch.jit.trace(network, example)
    torch.jit.save(traced, str(path))
    return f"torch {torch.__version__}"


class Runner:
    """Runs an exported file on NumPy batches, with the runtime a device would use."""

    def __init__(self, fmt: str, path: Path) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime

            self.session = onnxruntime.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
            self.runtime = f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"
        else:
            self.module = torch.jit.load(str(path)).eval()
            self.runtime = f"torch {torch.__version__} (TorchScript, CPU)"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.fmt == "onnx":
            return self.session.run(None, {self.session.get_inputs()[0].name: batch})[0]
        with torch.no_grad():
            return self.module(torch.from_numpy(batch)).numpy()


def verify(runner: Runner, network: nn.Module, images: torch.Tensor, tolerance: float) -> float:
    with torch.no_grad():
        expected = network(images).numpy()
    try:
        got = runner(images.numpy())
    except Exception as error:  # a runtime refusing the input is a failed verification too
        raise ExportFailed(f"the exported model failed on the TEST images: {error}") from None
    if got.shape != expected.shape:
        raise ExportFailed(f"exported outputs have shape {got.shape}, expected {expected.shape}")
    difference = float(np.abs(got - expected).max())
    if not difference < tolerance:
        raise ExportFailed(
            f"exported outputs differ from the trained model's by up to {difference:.2e} "
            f"(tolerance {tolerance:.0e}); the export was discarded"
        )
    return difference


def latency_ms(runner: Runner, image: np.ndarray) -> float:
    """Median milliseconds at batch 1 after warm-up."""
    for _ in range(WARMUP_RUNS):
        runner(image)
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        runner(image)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def export_package(
    trained: TrainedModel,
    fmt: str,
    output: Path,
    export_size: list[int] | None = None,
    tolerance: float = TOLERANCE,
) -> Path:
    """Write, verify and time one package; return its folder.

    ``export_size`` exports at another input size than the model's (a way to break an export
    on purpose: verification then feeds the model's own size and must fail).
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    cfg = trained.config
    if cfg["task"]["name"] != "image_classification":
        raise UserError(
            f"models export takes image classification models; {trained.model_id} is a "
            f"{cfg['task']['name']} model (its MLflow model serves: mlflow models serve)"
        )
    if cfg["model"]["type"] == "cloud":
        log.warning("exporting a cloud model: it is not sized for devices; mobile types are")
    network = load_network(trained)
    images = test_images(trained)
    height, width = export_size or cfg["model"]["input_size"]
    example = torch.zeros(2, 3, height, width)  # batch 2: a batch of 1 would freeze the size

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = output / f"model-export-{trained.model['displayName']}-{stamp}"
    staging = output / f".{final.name}.partial"
    staging.mkdir(parents=True)
    try:
        model_file = staging / FORMATS[fmt]
        produced_by = write_model(network, fmt, model_file, example)
        runner = Runner(fmt, model_file)
        difference = verify(runner, network, images, tolerance)
        latency = latency_ms(runner, images[:1].numpy())
        (staging / "labels.txt").write_text("\n".join(trained.labels) + "\n")
        write_json_atomic(
            staging / "metadata.json",
            {
                "task": cfg["task"]["name"],
                "modelType": cfg["model"]["type"],
                "modelId": trained.model_id,
                "displayName": trained.model["displayName"],
                "format": fmt,
                "file": FORMATS[fmt],
                "producedBy": produced_by,
                "input_size": list(cfg["model"]["input_size"]),
                "layout": "NCHW, float32, RGB; the batch size is free",
                "mean": list(cfg["data"]["mean"]),
                "std": list(cfg["data"]["std"]),
                "resize": RESIZE_RULE,
                "output": "logits, one per line of labels.txt in that order; softmax gives scores",
                "verification": {
                    "images": len(images),
                    "split": TEST,
                    "maxAbsDifference": difference,
                    "tolerance": tolerance,
                },
                "latencyMs": {
                    "batch": 1,
                    "median": round(latency, 4),
                    "runs": LATENCY_RUNS,
                    "runtime": runner.runtime,
                },
            },
        )
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final
