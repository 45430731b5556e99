"""TF Lite export (``models export --format tflite [--quantize int8]``): the package AutoML Vision
Edge shipped for phones, converted by Google's litert-torch and checked with LiteRT's
interpreter, the runtime an app uses.

The task says what is converted and how it is fed (``TfLitePlan``, trainer/tasks/__init__.py):
one image a call, NHWC uint8 pixels at the model's input size, with the normalization inside the
graph, as AutoML's quantized models took them. This module converts (float32, or int8 after
PT2E's full-integer quantization calibrated on TRAIN images), runs the file on TEST inputs and
judges it: a float file gives the trained model's answers (the task's comparison, as the ONNX
path's); an int8 file agrees with the float model's top label (a MULTILABEL model's label set)
on at least ``int8_min_top1_agreement`` of TEST and loses at most
``int8_max_accuracy_drop_points`` of TEST accuracy (conf/export.yaml), or the export fails
saying by how much.

litert-torch and ai-edge-litert are the optional extra ``vision-trainer[tflite]``: they bring
jax and transformers, which nothing else here needs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from trainer.data.manifest import TEST, TRAIN
from trainer.errors import UserError, first_line
from trainer.export_common import LATENCY_RUNS, QUANTIZATIONS, export_formats, latency_ms
from trainer.store.resources import write_json_atomic
from trainer.stored_model import TrainedModel, load_network
from trainer.tasks import TOP_LABEL, Decision, TfLitePlan, task_of

MODEL_FILE, LABELS_FILE, METADATA_FILE = "model.tflite", "dict.txt", "tflite_metadata.json"
EXTRA = "pip install 'vision-trainer[tflite]'"


def tflite_defaults() -> dict[str, Any]:
    """conf/export.yaml's ``tflite`` section."""
    return dict(export_formats()["tflite"])


def require_converter() -> None:
    """One line naming the extra when litert-torch or LiteRT is missing."""
    for module in ("litert_torch", "ai_edge_litert"):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise UserError(
                f"the TF Lite export needs the optional extra: {EXTRA} ({first_line(error)})"
            ) from None


def dequantized(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    if not scale:
        return values
    return (values.astype(np.float32) - zero_point) * scale


class Interpreter:
    """A .tflite file run by LiteRT's interpreter, one input a call; outputs in the order the
    converted network returned them."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter as LiteRT

        self.runner = LiteRT(model_path=str(path), num_threads=threads).get_signature_runner()
        self.input_name = next(iter(self.runner.get_input_details()))
        outputs = self.runner.get_output_details()  # name -> tensor details
        # litert-torch names them output_0, output_1, ... in the network's order.
        self.names = sorted(outputs, key=lambda name: int(name.rsplit("_", 1)[1]))
        self.outputs = [outputs[name] for name in self.names]
        version = importlib.metadata.version("ai-edge-litert")
        threads_used = f"{threads} thread{'s' * (threads > 1)}"
        self.runtime = f"ai-edge-litert {version} (LiteRT interpreter, CPU, {threads_used})"

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        """The outputs as floats: an int8 model's are dequantized with their scale and zero
        point, as an app does with outputTensors' quantization."""
        outputs = self.runner(**{self.input_name: batch})
        pairs = zip(self.names, self.outputs, strict=True)
        return [dequantized(outputs[name], detail) for name, detail in pairs]

    def tensors(self) -> dict[str, Any]:
        """AutoML's inputTensor / outputTensors fields: name, shape, type, quantization."""

        def described(detail: dict[str, Any]) -> dict[str, Any]:
            scale, zero_point = detail["quantization"]
            found = {"name": detail["name"], "shape": [int(n) for n in detail["shape"]],
                     "type": np.dtype(detail["dtype"]).name}  # fmt: skip
            if scale:
                found["quantization"] = {"scale": float(scale), "zeroPoint": int(zero_point)}
            return found

        inputs = [described(d) for d in self.runner.get_input_details().values()]
        outputs = [described(d) for d in self.outputs]  # in the network's order
        return {"inputTensor": inputs[0], "outputTensors": outputs}


def convert(plan: TfLitePlan, quantize: str, path: Path) -> str:
    """Convert the plan's network to ``path``; what converted it."""
    import litert_torch

    network, example = plan.network.eval(), (plan.example,)
    # litert-torch prints its progress (rich) on stdout, where the CLI prints the package's path.
    with contextlib.redirect_stdout(sys.stderr):
        if quantize == "int8":
            edge = litert_torch.convert(*_quantized(plan), quant_config=_quant_config())
        else:
            edge = litert_torch.convert(network, example)
        edge.export(str(path))
    strip_tensor_names(path)
    return f"litert-torch {importlib.metadata.version('litert-torch')}, torch {torch.__version__}"


def strip_tensor_names(path: Path) -> None:
    """Drop the names of the tensors that no signature names: litert-torch names each after its
    place in the traced graph, 100 to 150 KB of strings, 5% of an int8 MobileNetV3-Small.
    TF Lite's own ``flatbuffer_utils.strip_strings`` drops them too, but with the signatures that
    apps (and ``Interpreter`` here) call the model by, so this keeps those."""
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model(str(path))
    if any(buffer.offset for buffer in model.buffers):
        return  # a file over 2 GB keeps its weights outside the flatbuffer: write_model can't
    named = {
        (signature.subgraphIndex, tensor.tensorIndex)
        for signature in model.signatureDefs or []
        for tensor in [*(signature.inputs or []), *(signature.outputs or [])]
    }
    for place, subgraph in enumerate(model.subgraphs):
        for index, tensor in enumerate(subgraph.tensors):
            if (place, index) not in named:
                tensor.name = None
    flatbuffer_utils.write_model(model, str(path))


@functools.cache
def _quantizer() -> Any:
    from litert_torch.quantize.pt2e_quantizer import (
        PT2EQuantizer,
        get_symmetric_quantization_config,
    )

    per_channel = get_symmetric_quantization_config(is_per_channel=True)
    per_tensor = get_symmetric_quantization_config(is_per_channel=False)
    # torch.export's module stack names each module's type as a string, which the quantizer's
    # filter compares.
    excitation = f"{LinearSqueezeExcitation.__module__}.{LinearSqueezeExcitation.__qualname__}"
    quantizer = PT2EQuantizer().set_global(per_channel)
    return quantizer.set_module_type(excitation, per_tensor)


def _quant_config() -> Any:
    from litert_torch.quantize.quant_config import QuantConfig

    return QuantConfig(pt2e_quantizer=_quantizer())


def _quantized(plan: TfLitePlan) -> tuple[Any, tuple[torch.Tensor]]:
    """PT2E full-integer quantization: observers placed, fed the TRAIN calibration inputs, then
    turned into quantize/dequantize pairs that the converter folds into int8 kernels."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not plan.calibration:
        raise UserError("int8 needs TRAIN images to calibrate on, and the model has none")
    example = (plan.example,)
    network = quantization_friendly(copy.deepcopy(plan.network).eval())
    program = torch.export.export(network, example).module()
    prepared = prepare_pt2e(program, _quantizer())
    with torch.no_grad():
        for batch in plan.calibration:
            prepared(torch.from_numpy(batch))
    return convert_pt2e(prepared, fold_quantize=False), example


class QuantizableHardswish(nn.Module):
    """hardswish(x) = x * relu6(x + 3) / 6, in the ops PT2E's quantizer annotates (add, mul,
    relu6). nn.Hardswish stays float between dequantize and quantize, and LiteRT's XNNPACK
    delegate takes no int8 HARD_SWISH: MobileNetV3's int8 model then ran slower than its float
    one (3.0 ms against 0.83 at 224 px; 0.63 with these)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, torch.mul(F.relu6(torch.add(x, 3.0)), 1.0 / 6.0))


class QuantizableHardsigmoid(nn.Module):
    """hardsigmoid(x) = relu6(x + 3) / 6 (squeeze-and-excitation's gate), as above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(F.relu6(torch.add(x, 3.0)), 1.0 / 6.0)


class QuantizableSiLU(nn.Module):
    """silu(x) = x * sigmoid(x) (EfficientNet's activation): nn.SiLU stayed float, a dequantize
    and a quantize around each of its 65 uses in an int8 EfficientNet-B0; sigmoid and mul are
    int8 kernels in TF Lite."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mul(x, torch.sigmoid(x))


class LinearSqueezeExcitation(nn.Module):
    """torchvision's squeeze-and-excitation block with its two 1x1 convolutions, which act on one
    pooled vector, as the fully connected layers they are, quantized per tensor: per channel,
    their scales and zero points (12 bytes a channel, for the weights and again for the bias)
    outweighed their weights (5% of an int8 EfficientNet-B0, which missed the size target).
    Per-tensor weights inside convolutions stop litert-torch's NHWC layout pass; in fully
    connected layers they do not."""

    def __init__(self, block: SqueezeExcitation) -> None:
        super().__init__()
        self.fc1, self.fc2 = as_linear(block.fc1), as_linear(block.fc2)
        self.activation, self.scale_activation = block.activation, block.scale_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(pooled))))
        return torch.mul(scale[:, :, None, None], x)


def as_linear(conv: nn.Conv2d) -> nn.Linear:
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    linear.weight.data.copy_(conv.weight.data.flatten(1))
    if conv.bias is not None:
        linear.bias.data.copy_(conv.bias.data)
    return linear


def quantization_friendly(network: nn.Module) -> nn.Module:
    """``network`` written in ops the quantizer takes (the same function): squeeze-and-excitation
    blocks first, then the activations, theirs included."""
    _swap(network, {SqueezeExcitation: LinearSqueezeExcitation})
    _swap(network, {nn.Hardswish: lambda _: QuantizableHardswish(),
                    nn.Hardsigmoid: lambda _: QuantizableHardsigmoid(),
                    nn.SiLU: lambda _: QuantizableSiLU()})  # fmt: skip
    return network


def _swap(network: nn.Module, replacements: dict[type, Any]) -> None:
    """Every child of a type in ``replacements`` replaced by what its factory makes of it."""
    for module in list(network.modules()):
        for name, child in module.named_children():
            make = next((f for kind, f in replacements.items() if isinstance(child, kind)), None)
            if make is not None:
                setattr(module, name, make(child))


def references(plan: TfLitePlan) -> list[list[np.ndarray]]:
    """The trained model's answers on the plan's TEST inputs, as the package's are judged."""
    with torch.no_grad():
        return [plan.reference(batch) for batch in plan.inputs]


def answers(interpreter: Interpreter, plan: TfLitePlan) -> list[list[np.ndarray]]:
    try:
        return [plan.postprocess(interpreter(batch)) for batch in plan.inputs]
    except Exception as error:  # a runtime refusing the input is a failed verification too
        message = f"the TF Lite model failed on the TEST inputs: {first_line(error)}"
        raise UserError(message) from None


def judge_int8(
    expected: list[list[np.ndarray]], got: list[list[np.ndarray]], truth: list[Hashable],
    decision: Decision = TOP_LABEL,
) -> tuple[dict[str, Any], str | None]:  # fmt: skip
    """int8 against the float model: how often their decisions agree (each TEST image's top
    label; a MULTILABEL model's label set), and how much TEST accuracy int8 loses (figures,
    problem)."""
    limits = tflite_defaults()
    float_says = [decision.decide(np.ravel(want[0])) for want in expected]
    int8_says = [decision.decide(np.ravel(have[0])) for have in got]
    agreement = float(np.mean([a == b for a, b in zip(float_says, int8_says, strict=True)]))
    float_accuracy = float(np.mean([a == t for a, t in zip(float_says, truth, strict=True)]))
    int8_accuracy = float(np.mean([a == t for a, t in zip(int8_says, truth, strict=True)]))
    drop = 100 * (float_accuracy - int8_accuracy)
    accuracy = decision.accuracy_figure
    figures = {decision.agreement_figure: agreement, f"float{accuracy}": float_accuracy,
               f"int8{accuracy}": int8_accuracy, "testImages": len(truth)}  # fmt: skip
    least, most = limits["int8_min_top1_agreement"], limits["int8_max_accuracy_drop_points"]
    if agreement < least:
        return figures, (f"the int8 model agrees with the float one on {agreement:.1%} of TEST "
                         f"images' {decision.called}, below {least:.0%}")  # fmt: skip
    if drop > most:
        return figures, (f"the int8 model's TEST {decision.measure} is {drop:.1f} points below "
                         f"the float model's ({int8_accuracy:.1%} against "
                         f"{float_accuracy:.1%}), more than {most:g}")  # fmt: skip
    return figures, None


def tflite_plan(trained: TrainedModel, quantize: str, verified_inputs: int) -> TfLitePlan:
    """The task's plan for the stored network: TEST inputs to verify on, and TRAIN ones to
    calibrate int8 on."""
    task, manifest, options = task_of(trained.settings), trained.manifest(), tflite_defaults()
    # int8 is judged by TEST accuracy, on every TEST image, and calibrated on TRAIN ones; a float
    # file is verified as the ONNX one is.
    tests, calibration = manifest.split(TEST)[:verified_inputs], []
    if quantize == "int8":
        tests, calibration = (
            manifest.split(TEST),
            manifest.split(TRAIN)[: options["calibration_images"]],
        )
    network = load_network(trained)
    return task.tflite_plan(network, trained.settings, trained.labels, tests, calibration,
                            quantize, options)  # fmt: skip


def write_tflite(
    trained: TrainedModel, staging: Path, quantize: str, verified_inputs: int
) -> dict[str, Any]:
    """Write model.tflite, dict.txt and tflite_metadata.json into ``staging``, verified (on the
    first ``verified_inputs`` TEST items; int8 on all) and timed; metadata.json's fields."""
    if quantize not in QUANTIZATIONS:
        raise UserError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    require_converter()
    plan = tflite_plan(trained, quantize, verified_inputs)
    if not plan.inputs:
        raise UserError("the model has no TEST inputs to verify an export on")
    path = staging / MODEL_FILE
    produced_by = _convert_or_explain(plan, quantize, path, trained)
    interpreter = Interpreter(path)
    expected, got = references(plan), answers(interpreter, plan)
    if quantize == "int8":
        figures, problem = judge_int8(expected, got, plan.truth, plan.decision)
    else:
        verification = plan.compare(expected, got)
        figures, problem = verification.figures, verification.problem
    if problem:
        raise UserError(f"{problem}; the export was discarded")
    latency = latency_ms(interpreter, plan.inputs[0])
    (staging / LABELS_FILE).write_text("\n".join(trained.labels) + "\n")
    tensors = interpreter.tensors()
    tflite_metadata = {
        "inferenceType": "QUANTIZED_INT8" if quantize == "int8" else "FLOAT",
        "inputShape": tensors["inputTensor"]["shape"],
        **tensors,
        "labelsFile": LABELS_FILE,
        **plan.metadata,
    }
    write_json_atomic(staging / METADATA_FILE, tflite_metadata)
    return {
        "file": MODEL_FILE,
        "producedBy": produced_by,
        "quantize": quantize,
        "sizeBytes": path.stat().st_size,
        **plan.metadata,
        "verification": {"inputs": len(plan.inputs), "split": TEST, **figures},
        "latencyMs": {
            "batch": 1,
            "median": round(latency, 4),
            "runs": LATENCY_RUNS,
            "runtime": interpreter.runtime,
        },  # fmt: skip
    }


def _convert_or_explain(plan: TfLitePlan, quantize: str, path: Path, trained: TrainedModel) -> str:
    """A converter's refusal becomes one line naming the network and the reason."""
    try:
        return convert(plan, quantize, path)
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"litert-torch cannot convert model.constructor={trained.settings.model.constructor} "
            f"({'int8' if quantize == 'int8' else 'float'}; {type(error).__name__}: "
            f"{first_line(error)})"
        ) from None
