"""ONNX latency at batch 1 on this CPU for each mobile model type, side by side.

Each type's backbone is built at its own input size (conf/task_model/), exported with the same
code as `models export`, and timed with onnxruntime (median of 50 runs after 10 warm-ups). The
weights do not change the latency, so the networks are not trained here. Expected order:
low-latency fastest, high-accuracy slowest.

    .venv/bin/python benchmarks/export_latency.py
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from trainer import CONF_DIR
from trainer.export import Runner, latency_ms, write_model
from trainer.tasks.image_classification.networks import build_backbone

MOBILE = ["mobile-low-latency-1", "mobile-versatile-1", "mobile-high-accuracy-1"]


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model_type in MOBILE:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", [f"model_type={model_type}"])
            network = build_backbone(cfg.model.constructor, 10, pretrained=False).eval()
            height, width = cfg.model.input_size
            path = Path(folder) / f"{model_type}.onnx"
            write_model(network, "onnx", path, torch.zeros(2, 3, height, width))
            runner = Runner("onnx", path)
            milliseconds = latency_ms(runner, torch.rand(1, 3, height, width).numpy())
            rows.append((model_type, cfg.model.constructor, f"{height}x{width}", milliseconds))
    print(f"{'model type':<24} {'backbone':<20} {'input':<8} {'ms at batch 1 (median)':>22}")
    for model_type, constructor, size, milliseconds in rows:
        print(f"{model_type:<24} {constructor:<20} {size:<8} {milliseconds:>22.2f}")
    ordered = rows[0][3] < rows[1][3] < rows[2][3]
    print(f"low-latency < versatile < high-accuracy: {'yes' if ordered else 'NO'}")


if __name__ == "__main__":
    main()
