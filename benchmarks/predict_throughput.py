"""Images per second of batch prediction against the bare model's forward pass.

`predict` reads a CSV of image files, decodes them in worker processes, runs the network and
writes JSONL shards. The ceiling is the same network over the same images already decoded and
transformed in memory. Both use the default model type (its backbone and input size from
conf/), untrained: weights do not change the speed. Target: ratio >= 0.7 on CPU.

    .venv/bin/python benchmarks/predict_throughput.py [--images 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from trainer import CONF_DIR
from trainer.data.images import eval_transform
from trainer.data.prediction import BATCH_SIZE, default_workers, predict_images
from trainer.tasks.image_classification.demo import LABELS, write_shapes
from trainer.tasks.image_classification.networks import build_backbone
from trainer.tasks.image_classification.predict import RESULTS_PREFIX, classification_records


def bare_forward(network: torch.nn.Module, pixels: torch.Tensor) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(pixels), BATCH_SIZE):
            network(pixels[start : start + BATCH_SIZE]).softmax(dim=1)
    return len(pixels) / (time.perf_counter() - started)


def whole_job(network, paths: list[str], folder: Path, transform, workers: int) -> float:
    out = Path(tempfile.mkdtemp(dir=folder))
    records = classification_records(network, LABELS, threshold=0.5)
    result = predict_images(records, paths, folder, transform, out, RESULTS_PREFIX, workers=workers)
    return result.predicted / result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config")
    network = build_backbone(cfg.model.constructor, len(LABELS), pretrained=None).eval()
    transform = eval_transform(cfg.model.input_size, cfg.data.mean, cfg.data.std)
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        write_shapes(folder / "images", per_label=-(-args.images // len(LABELS)), size=64, seed=1)
        paths = sorted(str(p) for p in (folder / "images").rglob("*.png"))[: args.images]
        decoded = []
        for path in paths:
            with Image.open(path) as image:
                decoded.append(transform(image.convert("RGB")))
        pixels = torch.stack(decoded)
        bare, job = [], []
        for _ in range(args.rounds):  # interleaved: these VMs' speed drifts between phases
            bare.append(bare_forward(network, pixels))
            job.append(whole_job(network, paths, folder, transform, args.workers))
    model = cfg.model
    print(f"model type {model.type} ({model.constructor}, {list(model.input_size)} px), "
          f"{len(paths)} images, {args.workers} decoding workers, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"bare forward, decoded in memory: {statistics.median(bare):8.1f} images/s (median)")
    print(f"predict, files to JSONL:         {statistics.median(job):8.1f} images/s (median)")
    print(f"ratio: {statistics.median(job) / statistics.median(bare):.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
