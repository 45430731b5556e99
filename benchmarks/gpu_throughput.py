"""Training images/s on a GPU: the ceiling, the trainer decoding JPEGs, the trainer on the cache.

For each model type (the three mobile ones and cloud), three figures:

- (a) the ceiling: a plain PyTorch loop on synthetic images already on the device;
- (b) the trainer's data path and LightningModule on a folder of real-size JPEGs (640x480,
  about 150 KB), decoded and augmented by DataLoader workers on the CPU, as without the cache;
- (c) the same with the decoded-image cache: uint8 batches read from its memory map, cropped,
  flipped and normalized on the device. The cache's build time is printed too.

All three use the same backbone, batch size, optimizer, precision (bf16 autocast where the GPU
supports it) and channels_last. (b) and (c) run through Lightning with the trainer's budget
callback, without Hydra or MLflow, so the script runs on a bare GPU machine with torch,
torchvision, Lightning, NumPy and Pillow. Target: (c) >= 0.8 (a) for every mobile type.

    python benchmarks/gpu_throughput.py                       # a GPU machine, about 3 minutes
    python benchmarks/gpu_throughput.py --device cpu --images 96 --batch-size 8 --steps 4 \\
        --warmup 1 --input-size 32 --workers 0                # a smoke run on a CPU
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from budgets import BudgetMeter  # noqa: E402
from budgets.callback import BudgetStopping  # noqa: E402
from trainer.data.device_augment import resolve_precision  # noqa: E402
from trainer.data.image_cache import Layout, build_cache, open_cache  # noqa: E402
from trainer.data.images import make_loaders  # noqa: E402
from trainer.data.manifest import read_dataset  # noqa: E402
from trainer.tasks.image_classification.module import ImageClassifier  # noqa: E402
from trainer.tasks.image_classification.networks import build_backbone  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
MODEL_TYPES = {  # conf/task_model/image_classification/*.yaml, for machines without the tree
    "mobile-low-latency-1": ("mobilenet_v3_small", 128),
    "mobile-versatile-1": ("mobilenet_v3_large", 160),
    "mobile-high-accuracy-1": ("efficientnet_b0", 224),
    "cloud": ("resnet50", 224),
}
LABELS = 10
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def model_type(name: str) -> tuple[str, int]:
    """(constructor, input side) from the config tree when it is there."""
    for path in (
        CONF / "task_model" / "image_classification" / f"{name}.yaml",
        CONF / "model_type" / f"{name}.yaml",
    ):
        if path.is_file():
            try:
                import yaml

                model = yaml.safe_load(path.read_text())["model"]
                return model["constructor"], int(model["input_size"][0])
            except (ImportError, KeyError, TypeError):
                break
    return MODEL_TYPES[name]


# -- data ------------------------------------------------------------------------------------


def write_jpeg(args: tuple[Path, int]) -> int:
    """A 640x480 photo-like JPEG of about 150 KB: a smooth colour field plus sensor noise."""
    path, seed = args
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    base = np.asarray(field.resize((640, 480), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path.stat().st_size


def jpeg_folder(folder: Path, count: int) -> float:
    """``count`` JPEGs in one sub-folder per label; returns their mean size in KB."""
    jobs = []
    for index in range(count):
        label_dir = folder / f"label_{index % LABELS}"
        label_dir.mkdir(parents=True, exist_ok=True)
        jobs.append((label_dir / f"{index:05d}.jpg", index))
    todo = [job for job in jobs if not job[0].is_file()]
    with Pool(os.cpu_count()) as pool:
        pool.map(write_jpeg, todo, chunksize=16)
    return float(np.mean([job[0].stat().st_size for job in jobs])) / 1024


# -- (a) the ceiling -------------------------------------------------------------------------


def ceiling(args, constructor: str, side: int, precision: str, channels_last: bool) -> float:
    device = torch.device(args.device)
    model = build_backbone(constructor, LABELS, pretrained=None).to(device)
    images = torch.randn(args.batch_size, 3, side, side, device=device)
    if channels_last:
        model, images = (
            model.to(memory_format=torch.channels_last),
            images.contiguous(memory_format=torch.channels_last),
        )
    if args.compile:
        model = torch.compile(model)
    targets = torch.randint(0, LABELS, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed")
    started = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- (b) and (c): the trainer's data path and module -------------------------------------------


class Throughput(pl.Callback):
    """Images per second from the end of the warm-up steps to the end of training.

    The device is synchronized only there, twice, as in the ceiling's loop: a synchronization
    after every step would stop the CPU from queueing the next step (fetching and copying the
    batch, launching its kernels) while the GPU still runs this one, and would measure that
    serialization rather than the data path.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.started, self.ended = warmup, 0, 0.0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = trainer.global_step
        if done == self.warmup:
            synchronize(pl_module.device)
            self.started = time.perf_counter()
        elif done > self.warmup:
            self.images += len(batch[1])

    def on_train_end(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        self.ended = time.perf_counter()

    def rate(self) -> float:
        return self.images / max(self.ended - self.started, 1e-9)


def config(args, side: int, cache: str, home: Path) -> dict[str, Any]:
    """The slice of the trainer's config that its data path reads."""
    accelerator = "cuda" if args.device == "cuda" else "cpu"
    return {
        "model": {"input_size": [side, side]},
        "data": {
            "batch_size": args.batch_size,
            "num_workers": args.workers,
            "crop_scale": [0.6, 1.0],
            "horizontal_flip": True,
            "mean": MEAN,
            "std": STD,
            "cache": cache,
            "cache_max_gb": 1000,
            "cache_num_workers": args.cache_workers,
        },
        "trainer": {
            "accelerator": accelerator,
            "channels_last": "auto",
            "compile": args.compile,
            "compile_reserve_seconds": 600,
        },
        "seed": 0,
        "home": str(home),
    }


def through_trainer(args, manifest, constructor: str, cfg: dict[str, Any], precision: str) -> float:
    torch.manual_seed(0)
    loaders = make_loaders(manifest, cfg, remaining_seconds=10**9)
    module = ImageClassifier(build_backbone(constructor, LABELS, False), LABELS, 1e-3, 1e-4)
    timer = Throughput(args.warmup)
    budget = BudgetStopping(BudgetMeter(10**6), final_eval_batches=1, save_seconds=1.0)
    trainer = pl.Trainer(
        accelerator=cfg["trainer"]["accelerator"], devices=1, precision=precision,
        max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[budget, timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=cfg["home"],
    )  # fmt: skip
    trainer.fit(module, loaders.train)
    return timer.rate()


def build(manifest, side: int, home: Path) -> tuple[float, int]:
    """Build the cache for one input size; (seconds, images)."""
    layout = Layout.of(manifest, [side, side], [0.6, 1.0])
    if open_cache(home, layout) is not None:
        return 0.0, 0
    result = build_cache(manifest, layout, home)
    return result.seconds, result.decoded


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-types", nargs="+", default=list(MODEL_TYPES))
    parser.add_argument("--images", type=int, default=3000, help="JPEGs in the folder")
    parser.add_argument("--data-dir", type=Path, help="keep the JPEGs here (default: a temp dir)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="(b)'s decoders")
    parser.add_argument("--cache-workers", default="auto", help="(c)'s loader processes")
    parser.add_argument("--input-size", type=int, help="one input size for every model type")
    parser.add_argument("--compile", action="store_true", help="torch.compile in (a) and (c)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for noisy in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    accelerator = "cuda" if args.device == "cuda" else "cpu"
    precision = str(resolve_precision("auto", accelerator))
    channels_last = accelerator == "cuda"
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.data_dir or Path(scratch) / "jpegs"
        started = time.perf_counter()
        kilobytes = jpeg_folder(folder, args.images)
        manifest = read_dataset(folder)
        home = Path(scratch) / "home"
        print(header(args, precision, channels_last, kilobytes, time.perf_counter() - started))
        rows = []
        for name in args.model_types:
            constructor, side = model_type(name)
            side = args.input_size or side
            seconds, decoded = build(manifest, side, home)
            if decoded:
                print(f"cache build at {side}px: {decoded} images in {seconds:.1f} s "
                      f"({decoded / max(seconds, 1e-9):.0f} images/s)", flush=True)  # fmt: skip
            a = ceiling(args, constructor, side, precision, channels_last)
            b = through_trainer(
                args, manifest, constructor, config(args, side, "off", home), precision
            )
            c = through_trainer(
                args, manifest, constructor, config(args, side, "on", home), precision
            )
            rows.append((name, constructor, side, a, b, c))
            print(row(*rows[-1]), flush=True)
    print()
    print(table(rows))


def header(args, precision: str, channels_last: bool, kilobytes: float, seconds: float) -> str:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    return (
        f"device: {device}, {os.cpu_count()} CPU cores; torch {torch.__version__}, "
        f"lightning {pl.__version__}; {precision}, channels_last {channels_last}, "
        f"compile {args.compile}, batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup}\ndata: {args.images} JPEGs of {kilobytes:.0f} KB (640x480), written and "
        f"checked in {seconds:.0f} s; (b) {args.workers} decoding workers, (c) cache workers "
        f"{args.cache_workers}"
    )


COLUMNS = "model type                network             input  (a) ceiling  (b) JPEG  (c) cache"


def row(name: str, constructor: str, side: int, a: float, b: float, c: float) -> str:
    return (
        f"{name:<25} {constructor:<19} {side:>5}  {a:>11.0f}  {b:>8.0f}  {c:>9.0f}"
        f"   b/a {b / a:.2f}  c/a {c / a:.2f}"
    )


def table(rows: list[tuple]) -> str:
    lines = ["images/s", COLUMNS, *(row(*r) for r in rows)]
    mobile = [r for r in rows if r[0].startswith("mobile")]
    if mobile:
        met = all(r[5] >= 0.8 * r[3] for r in mobile)
        lines.append(f"target (c) >= 0.8 (a) for every mobile type: {'met' if met else 'NOT met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
