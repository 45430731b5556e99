"""Latency at batch 1 on this CPU of every task's exported model types, side by side.

Each model type's network is built at its own input size (conf/task_model/), exported with the
same code as `models export` (the task's ExportPlan, trainer/export.py) and timed with the
format's runtime (median of 50 runs after 10 warm-ups). The weights do not change the latency
much, so the networks are not trained here; a detector's time depends a little on how many
boxes reach its non-maximum suppression, shown in the last column. Expected order within each
task: low-latency fastest, high-accuracy slowest.

    .venv/bin/python benchmarks/export_latency.py [--format onnx|torchscript] [--task TASK]
    .venv/bin/python benchmarks/export_latency.py --tflite

``--tflite`` (the extra vision-trainer[tflite]) prints the mobile classification types instead:
ONNX (onnxruntime), TF Lite float and TF Lite int8 (LiteRT's interpreter), each at batch 1 with
as many threads as this machine has cores, and each file's size. int8 is calibrated on 16 random
uint8 images here. The batch norms get random statistics first, as training leaves them: a fresh
network's are all alike, so its folded biases are equal and the converter stores each once,
which made a fresh int8 file 1-2% smaller than a trained one. Otherwise the weights change
neither the size nor the kernels' time.
Targets: int8 at most 0.3 of the float file's size, and faster than the float TF Lite model.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path

import torch

from trainer import CONF_DIR
from trainer.data.input_size import auto_input_size
from trainer.export import Runner, as_arrays, write_model
from trainer.export_common import QUANTIZATIONS, latency_ms
from trainer.settings import Settings, composed
from trainer.tasks import task_configs, task_of

MOBILE = ["mobile-low-latency-1", "mobile-versatile-1", "mobile-high-accuracy-1"]
LABELS = {"image_classification": 10, "object_detection": 3, "video_classification": 4}


def model_types(task: str) -> list[str]:
    """The task's model types (not aliases such as `default`): mobile ones in latency order,
    then the others."""
    import yaml

    files = sorted((CONF_DIR / "task_model" / task).glob("*.yaml"))
    offered = [p.stem for p in files if "model" in (yaml.safe_load(p.read_text()) or {})]
    return [t for t in MOBILE if t in offered] + [t for t in offered if t not in MOBILE]


def measure(task: str, model_type: str, fmt: str, folder: Path) -> tuple[str, str, float, str]:
    settings = Settings.parse(composed(task, model_type))
    # input_size=auto, settled as a training with no readable image size settles it.
    size = auto_input_size(None, settings.model, settings.task.input_stride)
    settings = settings.replace_in("model", input_size=list(size))
    kind = task_of(settings)
    labels = [f"label_{i}" for i in range(LABELS[task])]
    network = kind.network(settings, labels, pretrained=None).eval()
    plan = kind.export_plan(network, settings, labels, [])
    path = folder / f"{task}-{model_type}.{fmt}"
    write_model(plan, fmt, path)
    runner = Runner(fmt, path)
    example = plan.example[:1].numpy()
    outputs = as_arrays(plan.network(plan.example[:1])) if not plan.batch_free else []
    boxes = str(len(outputs[0])) if outputs else ""
    shape = "x".join(str(v) for v in plan.example.shape[1:])
    return settings.model.constructor, shape, latency_ms(runner, example), boxes


def trained_like(network: torch.nn.Module) -> torch.nn.Module:
    """Batch norms with statistics as unlike each other as a trained network's (see above)."""
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.1, 0.1)
    return network


def tflite_row(model_type: str, folder: Path) -> str:
    """ONNX, TF Lite float and TF Lite int8 of one mobile classification type: ms and MB."""
    import os

    import numpy as np

    from trainer import tflite

    task = "image_classification"
    settings = Settings.parse(composed(task, model_type))
    size = auto_input_size(None, settings.model, settings.task.input_stride)
    settings = settings.replace_in("model", input_size=list(size))
    kind, labels = task_of(settings), [f"label_{i}" for i in range(LABELS[task])]
    network = trained_like(kind.network(settings, labels, pretrained=None).eval())
    onnx = folder / f"{model_type}.onnx"
    onnx_plan = kind.export_plan(network, settings, labels, [])
    write_model(onnx_plan, "onnx", onnx)
    figures = [(latency_ms(Runner("onnx", onnx), onnx_plan.example[:1].numpy()), onnx)]
    plan = kind.tflite_plan(network, settings, labels, [], [], "none", tflite.tflite_defaults())
    random = np.random.default_rng(0)
    plan.calibration = [random.integers(0, 256, (1, *size, 3), dtype=np.uint8) for _ in range(16)]
    for quantize in QUANTIZATIONS:
        path = folder / f"{model_type}-{quantize}.tflite"
        tflite.convert(plan, quantize, path)
        interpreter = tflite.Interpreter(path, threads=os.cpu_count() or 1)
        figures.append((latency_ms(interpreter, plan.example.numpy()), path))
    (_, _), (float_ms, float_file), (int8_ms, int8_file) = figures
    ratio = int8_file.stat().st_size / float_file.stat().st_size
    cells = " ".join(f"{ms:>9.2f} {file.stat().st_size / 1e6:>7.2f}" for ms, file in figures)
    shape = "x".join(str(v) for v in size)
    return (f"{model_type:<24} {shape:<8} {cells} {ratio:>10.2f} "
            f"{'yes' if int8_ms < float_ms else 'NO':>12}")  # fmt: skip


def main_tflite() -> None:
    print(f"{'model type':<24} {'input':<8} {'onnx ms':>9} {'MB':>7} {'float ms':>9} {'MB':>7} "
          f"{'int8 ms':>9} {'MB':>7} {'int8/float':>10} {'int8 faster':>12}")  # fmt: skip
    with tempfile.TemporaryDirectory() as temp:
        for model_type in MOBILE:
            print(tflite_row(model_type, Path(temp)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    parser.add_argument("--task", action="append", choices=sorted(task_configs()))
    parser.add_argument("--tflite", action="store_true", help="the TF Lite table (see above)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    if args.tflite:
        main_tflite()
        return
    print(f"{'task':<22} {'model type':<24} {'network':<38} {'input':<12} "
          f"{'ms (median)':>11} {'boxes':>5}")  # fmt: skip
    with tempfile.TemporaryDirectory() as temp, torch.no_grad():
        for task in args.task or sorted(task_configs()):
            times = {}
            for model_type in model_types(task):
                network, shape, milliseconds, boxes = measure(task, model_type, args.format,
                                                              Path(temp))  # fmt: skip
                times[model_type] = milliseconds
                print(f"{task:<22} {model_type:<24} {network:<38} {shape:<12} "
                      f"{milliseconds:>11.2f} {boxes:>5}", flush=True)  # fmt: skip
            mobile = [times[t] for t in MOBILE if t in times]
            if len(mobile) > 1:
                ordered = all(a < b for a, b in zip(mobile, mobile[1:], strict=False))
                print(f"{task}: mobile types in latency order: {'yes' if ordered else 'NO'}")


if __name__ == "__main__":
    main()
