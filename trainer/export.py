"""Edge export: an ONNX, TorchScript or TF Lite (trainer/tflite.py) package that runs without
this project, verified and timed; and the docker export, a folder that builds an image serving
the model online (trainer/serving/docker.py).

The model's task says what is exported, how it is fed and how its answers are judged
(``ExportPlan``, trainer/tasks/__init__.py); this module writes the file, runs it with the
runtime a device would use on real TEST inputs, times it and writes the package. A package is
written aside and renamed into place only once the exported model has given the trained model's
answers (a docker export: once its serving package has loaded back), so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data.manifest import TEST
from trainer.errors import UserError, first_line
from trainer.export_common import LATENCY_RUNS, check_format, latency_ms
from trainer.settings import Settings
from trainer.store.lifecycle import operation_on_record
from trainer.store.resources import write_json_atomic
from trainer.stored_model import TrainedModel, load_network, trained_model
from trainer.tasks import ExportPlan, task_of

log = logging.getLogger("trainer")

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}  # written and run here
DOCKER = "docker"  # the model server's image (trainer/serving/docker.py), not a model file
TFLITE = "tflite"  # trainer/tflite.py
ONNX_OPSET = 17  # for torch.onnx's TorchScript-based exporter; dynamo picks its own
VERIFIED_INPUTS = 16


class ExportFailed(UserError):
    """The model could not be exported, or the export did not give the trained model's answers;
    nothing was kept."""


def write_model(plan: ExportPlan, fmt: str, path: Path) -> str:
    """Write the plan's network; return what produced it (opset or torch version)."""
    network, example = plan.network, plan.example
    if fmt == "torchscript":
        if plan.torchscript == "script":
            exported = torch.jit.script(network)
        else:
            exported = torch.jit.trace(network, example)
        torch.jit.save(exported, str(path))
        return f"torch {torch.__version__}"
    names = {"input_names": [plan.input_name], "output_names": plan.output_names}
    if plan.onnx_exporter == "dynamo":
        shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if plan.batch_free else None
        program = torch.onnx.export(
            network, (example,), dynamo=True, dynamic_shapes=shapes, external_data=False,
            verbose=False, **names,
        )  # fmt: skip
        program.save(str(path), external_data=False)
    else:
        with warnings.catch_warnings():  # its deprecation notice: dynamo cannot do this model
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET, **names
            )
    import onnx

    return f"onnx opset {onnx.load(str(path), load_external_data=False).opset_import[0].version}"


class Runner:
    """Runs an exported file on a NumPy batch, with the runtime a device would use; returns
    every output as an array."""

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

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        if self.fmt == "onnx":
            return self.session.run(None, {self.session.get_inputs()[0].name: batch})
        with torch.no_grad():
            return as_arrays(self.module(torch.from_numpy(batch)))


def as_arrays(outputs: Any) -> list[np.ndarray]:
    """A network's output, one tensor or several, as a list of arrays."""
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().numpy()]
    return [output.detach().numpy() for output in outputs]


def verify(runner: Runner, plan: ExportPlan) -> dict[str, Any]:
    """Run the trained network and the exported one on the plan's inputs; the figures of the
    comparison, or ExportFailed."""
    if not plan.inputs:
        raise ExportFailed("the model has no TEST inputs to verify an export on")
    with torch.no_grad():
        expected = [as_arrays(plan.network(torch.from_numpy(batch))) for batch in plan.inputs]
    try:
        got = [runner(batch) for batch in plan.inputs]
    except Exception as error:  # a runtime refusing the input is a failed verification too
        raise ExportFailed(f"the exported model failed on the TEST inputs: {error}") from None
    verification = plan.compare(expected, got)
    if verification.problem:
        raise ExportFailed(f"{verification.problem}; the export was discarded")
    return verification.figures


def export_plan(trained: TrainedModel) -> ExportPlan:
    """The task's plan for the stored network, verified on the first TEST items."""
    task = task_of(trained.settings)
    items = trained.manifest().split(TEST)[:VERIFIED_INPUTS]
    return task.export_plan(load_network(trained), trained.settings, trained.labels, items)


def export_stored(
    catalog: Any, model_id: str, fmt: str, output: Path, quantize: str = "none"
) -> Path:
    """`models export`: ``export_package`` as an operation on record (exportModelDetails)."""
    trained = trained_model(catalog, model_id, "export")
    output_info = {"gcsOutputDirectory": str(output)}  # AutoML's name; a local folder here
    operation = trained.new_operation(("exportModelDetails", {"outputInfo": output_info}))
    tags = {"model_id": trained.model_id, "kind": "export"}
    params = {"id": model_id, "format": fmt, "output": str(output)}
    name = f"export_{trained.model['displayName']}"
    with operation_on_record(catalog.store, name, tags, params, operation):
        package = export_package(trained, fmt, output, quantize=quantize)
        output_info["gcsOutputDirectory"] = str(package)
        operation.succeed("", {})  # ExportModel's response is google.protobuf.Empty
    print(operation.name, file=sys.stderr)
    return package


def export_package(
    trained: TrainedModel,
    fmt: str,
    output: Path,
    export_size: list[int] | None = None,
    quantize: str = "none",
) -> Path:
    """Write, verify and time one package (a docker export: write and load back); return its
    folder.

    ``export_size`` exports at another input size than the model's (a way to break an export
    on purpose: verification then feeds the model's own size and must fail).
    """
    check_format(fmt)
    if quantize != "none" and fmt != TFLITE:
        raise UserError(f"--quantize {quantize} is for --format {TFLITE}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    final = output / f"model-export-{trained.model['displayName']}-{stamp}"
    staging = output / f".{final.name}.partial"
    staging.mkdir(parents=True)
    try:
        if fmt == DOCKER:
            from trainer.serving.docker import write_docker_export

            details = write_docker_export(trained, staging)
        elif fmt == TFLITE:
            from trainer.tflite import write_tflite

            details = write_tflite(trained, staging, quantize, VERIFIED_INPUTS)
        else:
            details = _write_edge_model(trained, fmt, staging, export_size)
        write_json_atomic(staging / "metadata.json", {**_identity(trained, fmt), **details})
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _identity(trained: TrainedModel, fmt: str) -> dict[str, Any]:
    """What every export's metadata.json begins with."""
    return {
        "task": trained.settings.task.name,
        "modelType": trained.settings.model.type,
        "modelId": trained.model_id,
        "displayName": trained.model["displayName"],
        "format": fmt,
    }


def _write_edge_model(
    trained: TrainedModel, fmt: str, staging: Path, export_size: list[int] | None
) -> dict[str, Any]:
    """Write the ONNX or TorchScript file and labels.txt, verified and timed; the metadata."""
    settings = trained.settings
    if settings.model.type.startswith("cloud"):
        log.warning("exporting a cloud model: it is not sized for devices; mobile types are")
    plan = export_plan(trained)
    if export_size is not None:
        plan.example = torch.zeros(*plan.example.shape[:-2], *export_size)
    model_file = staging / FORMATS[fmt]
    produced_by = _write_or_explain(plan, fmt, model_file, settings)
    runner = Runner(fmt, model_file)
    figures = verify(runner, plan)
    latency = latency_ms(runner, plan.inputs[0][:1])
    (staging / "labels.txt").write_text("\n".join(trained.labels) + "\n")
    return {
        "file": FORMATS[fmt],
        "producedBy": produced_by,
        **plan.metadata,
        "verification": {
            "inputs": sum(len(b) for b in plan.inputs),
            "split": TEST,
            **figures,
        },  # fmt: skip
        "latencyMs": {
            "batch": 1,
            "median": round(latency, 4),
            "runs": LATENCY_RUNS,
            "runtime": runner.runtime,
        },
    }


def _write_or_explain(plan: ExportPlan, fmt: str, path: Path, settings: Settings) -> str:
    """Write the model; an exporter's refusal becomes one line naming the reason and the
    model types whose networks are known to export (the ones conf/ offers for this task)."""
    try:
        return write_model(plan, fmt, path)
    except Exception as error:
        from trainer.job.settings import model_types

        reason = first_line(error)
        task = settings.task.name
        offered = ", ".join(t for t in model_types(task) if t != "default")
        raise ExportFailed(
            f"{fmt} cannot export model.constructor={settings.model.constructor} "
            f"({type(error).__name__}: {reason}); the {task} model types "
            f"{offered} export to {' and '.join(FORMATS)}"
        ) from None
