"""Training images/s on a GPU: every data path of the trainer against the on-GPU ceiling.

For each model type, one row per path, each with its ratio to the ceiling:

- ``ceiling``: a plain PyTorch loop on synthetic images already on the device;
- ``jpeg``: the trainer's data path and LightningModule on a folder of real-size JPEGs (640x480,
  about 150 KB), decoded and augmented by DataLoader workers on the CPU, as without the cache;
- ``cache-host``: the decoded-image cache read from its memory map by background threads into
  pinned batches (``data.cache_on_device=off``), cropped, flipped and normalized on the device;
- ``cache-device``: the cache's splits held on the device as uint8 tensors, batches drawn there
  by index (``data.cache_on_device=on``): no loader threads, no host copy per batch;
- ``ddp-N`` (``--devices N``, N GPUs present): ``python -m trainer`` with
  ``trainer.devices=N trainer.strategy=ddp`` on the cache, a whole budgeted training (validation
  included), for the first model type; its ratio is to N ceilings.

Warm-up steps (compilation, cuDNN's choices, the cache's first load onto the device) are timed
apart from the measured steps. All rows use the same backbone, batch size, optimizer, precision
(bf16 autocast where the GPU supports it) and channels_last; the single-device rows run through
Lightning with the trainer's budget callback, without Hydra or MLflow, so the script runs on a
bare GPU machine with torch, torchvision, Lightning, NumPy and Pillow. Target: cache-device >=
0.8 of the ceiling for every mobile type. ``--out`` writes the table as JSON.

    python benchmarks/gpu_throughput.py --out gpu.json        # a GPU machine, under 5 minutes
    python benchmarks/gpu_throughput.py --devices 2           # adds the DDP row on 2 GPUs
    python benchmarks/gpu_throughput.py --device cpu --images 256 --batch-size 16 --steps 5 \\
        --warmup 2 --input-size 64 --workers 1 --model-types mobile-low-latency-1  # on a CPU
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from budgets import BudgetMeter  # noqa: E402
from budgets.callback import BudgetStopping  # noqa: E402
from trainer.data.device_augment import resolve_precision  # noqa: E402
from trainer.data.image_cache import Layout, build_cache, open_cache  # noqa: E402
from trainer.data.images import make_loaders  # noqa
from trainer.data.manifest import read_dataset  # noqa: E402
from trainer.settings import Settings, composed, deep_merge  # noqa: E402
from trainer.tasks.image_classification.module import ImageClassifier  # noqa: E402
from trainer.tasks.image_classification.networks import build_backbone  # noqa: E402

CONF = REPO / "conf"
MODEL_TYPES = {  # conf/task_model/image_classification/*.yaml, for machines without the tree
    "mobile-low-latency-1": ("mobilenet_v3_small", 128),
    "mobile-versatile-1": ("mobilenet_v3_large", 160),
    "mobile-high-accuracy-1": ("efficientnet_b0", 224),
    "cloud": ("resnet50", 224),
}
LABELS = 10
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CROP_SCALE = [0.6, 1.0]
# The single-device paths through the trainer: (row name, data.cache, data.cache_on_device).
TRAINER_PATHS = (
    ("jpeg", "off", "off"),
    ("cache-host", "on", "off"),
    ("cache-device", "on", "on"),
)
DDP_BUDGET = 20  # milli-node-hours (72 s) for the DDP row's whole training
DDP_RESERVE = 120  # seconds: that training, its start-up, TEST pass and recording


@dataclass
class Row:
    model_type: str
    network: str
    input: int
    path: str
    images_per_s: float | None  # None: the row could not be measured
    vs_ceiling: float | None
    warmup_s: float | None  # from the start (model built, fit called) to the first timed step


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
                return model["constructor"], int(model["largest_input_size"][0])
            except (ImportError, KeyError, TypeError, ValueError):
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


# -- the ceiling -----------------------------------------------------------------------------


def ceiling(
    args, constructor: str, side: int, precision: str, channels_last: bool
) -> tuple[float, float]:
    """(images/s, warm-up seconds) of a plain loop on images already on the device."""
    started = time.perf_counter()
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
    warmed = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            warmed = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - warmed), warmed - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the trainer's data paths and module -------------------------------------------------------


class Throughput(pl.Callback):
    """Images per second from the end of the warm-up steps to the end of training.

    The device is synchronized only there, twice, as in the ceiling's loop: a synchronization
    after every step would stop the CPU from queueing the next step (fetching and copying the
    batch, launching its kernels) while the GPU still runs this one, and would measure that
    serialization rather than the data path.
    """

    def __init__(self, warmup: int, started: float) -> None:
        self.warmup, self.images = warmup, 0
        self.began, self.started, self.ended = started, 0.0, 0.0

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

    def warmup_seconds(self) -> float:
        return self.started - self.began


def config(args, side: int, cache: str, on_device: str, home: Path) -> Settings:
    """The trainer's settings, as its data path reads them."""
    accelerator = "cuda" if args.device == "cuda" else "cpu"
    return Settings.parse(
        deep_merge(
            composed("image_classification", "default"),
            {
                "model": {"input_size": [side, side]},
                "data": {
                    "batch_size": args.batch_size,
                    "num_workers": args.workers,
                    "crop_scale": CROP_SCALE,
                    "horizontal_flip": True,
                    "mean": MEAN,
                    "std": STD,
                    "cache": cache,
                    "cache_max_gb": 1000,
                    "cache_num_workers": args.cache_workers,
                    "cache_on_device": on_device,
                    "cache_on_device_share": 1.0,  # `on` holds it whatever the share
                },
                "trainer": {
                    "accelerator": accelerator,
                    "channels_last": "auto",
                    "compile": args.compile,
                    "compile_reserve_seconds": 600,
                },
                "seed": 0,
                "home": str(home),
            },
        )
    )


def through_trainer(
    args, manifest, constructor: str, cfg: Settings, precision: str
) -> tuple[float, float]:
    """(images/s, warm-up seconds) of the trainer's module on one data path."""
    torch.manual_seed(0)
    started = time.perf_counter()
    loaders = make_loaders(manifest, cfg, remaining_seconds=10**9)
    module = ImageClassifier(build_backbone(constructor, LABELS, None), LABELS, 1e-3, 1e-4)
    timer = Throughput(args.warmup, started)
    budget = BudgetStopping(BudgetMeter(10**6), final_eval_batches=1, save_seconds=1.0)
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision=precision,
        max_steps=args.warmup + args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[budget, timer], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=cfg.home,
    )  # fmt: skip
    trainer.fit(module, loaders.train)
    return timer.rate(), timer.warmup_seconds()


def build(manifest, side: int, home: Path) -> tuple[float, int]:
    """Build the cache for one input size; (seconds, images)."""
    layout = Layout.of(manifest, [side, side], CROP_SCALE)
    if open_cache(home, layout) is not None:
        return 0.0, 0
    result = build_cache(manifest, layout, home)
    return result.seconds, result.decoded


# -- DDP through the trainer's command line ------------------------------------------------------

STATUS = re.compile(r"^\[(?P<time>[\d-]+ [\d:]+,\d+)\].*?epoch \d+ \| step (?P<step>\d+)", re.M)


def ddp_rate(
    args, name: str, side: int, folder: Path, scratch: Path, limit: float
) -> tuple[float | None, str]:
    """Images/s of ``python -m trainer`` on ``args.devices`` GPUs, from its status lines (one
    per validation): steps between the first and the last, times the global batch."""
    command = [
        sys.executable, "-m", "trainer", f"dataset.path={folder}", f"model_type={name}",
        f"model.input_size=[{side},{side}]", f"data.batch_size={args.batch_size}",
        "data.cache=on", "data.cache_on_device=auto", "model.pretrained=false",
        f"trainer.devices={args.devices}", "trainer.strategy=ddp",
        f"trainer.compile={str(args.compile).lower()}", "budget.min_milli_node_hours=1",
        f"budget.train_budget_milli_node_hours={DDP_BUDGET}", "budget.disable_early_stopping=true",
        "budget.save_reserve_seconds=15", "mlflow.model_format=torchscript",
        "display_name=gpu_throughput_ddp",
    ]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    environment.update(
        VISION_TRAINER_HOME=str(scratch / "home"), PYTHONPATH=str(REPO),
        MLFLOW_TRACKING_URI=f"sqlite:///{scratch / 'mlflow.db'}",
    )  # fmt: skip
    try:
        ran = subprocess.run(
            command, cwd=scratch, env=environment, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        return None, f"still running after {limit:.0f} s"
    lines = [(stamp(m["time"]), int(m["step"])) for m in STATUS.finditer(ran.stderr)]
    if ran.returncode != 0 or len(lines) < 2 or lines[-1][1] <= lines[0][1]:
        tail = ran.stderr.strip().splitlines()[-1:] or ["no output"]
        return None, f"exit {ran.returncode}, {len(lines)} status lines: {tail[0]}"
    (t0, s0), (t1, s1) = lines[0], lines[-1]
    return (s1 - s0) * args.batch_size * args.devices / max(t1 - t0, 1e-9), ""


def stamp(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


# -- main ------------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-types", nargs="+", default=list(MODEL_TYPES))
    parser.add_argument("--images", type=int, default=2048, help="JPEGs in the folder")
    parser.add_argument("--data-dir", type=Path, help="keep the JPEGs here (default: a temp dir)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="jpeg's decoders")
    parser.add_argument("--cache-workers", default="auto", help="cache-host's reader threads")
    parser.add_argument("--input-size", type=int, help="one input size for every model type")
    parser.add_argument("--compile", action="store_true", help="torch.compile every row")
    parser.add_argument("--devices", type=int, default=1, help="2 or more: add the DDP row")
    parser.add_argument("--out", type=Path, help="write the table here as JSON")
    parser.add_argument("--max-seconds", type=float, default=300, help="the whole run's limit")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    warnings.filterwarnings("ignore")
    for noisy in ("lightning.pytorch", "lightning.fabric", "trainer"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    began = time.perf_counter()
    accelerator = "cuda" if args.device == "cuda" else "cpu"
    precision = str(resolve_precision("auto", accelerator))
    channels_last = accelerator == "cuda"
    device_name = torch.cuda.get_device_name() if accelerator == "cuda" else cpu_name()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(temporary)
        folder = args.data_dir or scratch / "jpegs"
        kilobytes = jpeg_folder(folder, args.images)
        manifest = read_dataset(folder)
        home = scratch / "home"
        print(header(args, device_name, precision, channels_last, kilobytes, began), flush=True)
        print(COLUMNS, flush=True)
        # One answer within --max-seconds: a model type that would end past it (judged by the
        # slowest so far, with the DDP row's time kept) is skipped, said in one line.
        deadline = began + args.max_seconds - (DDP_RESERVE if args.devices > 1 else 0)
        slowest = 0.0
        for name in args.model_types:
            if time.perf_counter() + slowest > deadline:
                print(f"{name}: skipped, it would end past --max-seconds={args.max_seconds:g}")
                continue
            started = time.perf_counter()
            rows += measure(args, name, manifest, home, precision, channels_last)
            slowest = max(slowest, time.perf_counter() - started)
        rows += ddp_rows(args, rows, folder, scratch, began + args.max_seconds)
    print()
    print(table(rows))
    print(f"whole run: {time.perf_counter() - began:.0f} s")
    if args.out:
        summary = {"device": device_name, "settings": settings(args, precision), "rows": rows}
        args.out.write_text(json.dumps(summary, default=asdict, indent=2) + "\n")
        print(f"written: {args.out}")


def measure(args, name: str, manifest, home: Path, precision: str, channels_last: bool):
    """The ceiling's row, then each trainer path's, printed as they come."""
    constructor, side = model_type(name)
    side = args.input_size or side
    seconds, decoded = build(manifest, side, home)
    if decoded:
        print(f"cache build at {side}px: {decoded} images in {seconds:.1f} s "
              f"({decoded / max(seconds, 1e-9):.0f} images/s)", flush=True)  # fmt: skip
    rate, warm = ceiling(args, constructor, side, precision, channels_last)
    rows = [Row(name, constructor, side, "ceiling", rate, 1.0, warm)]
    print(row(rows[-1]), flush=True)
    for path, cache, on_device in TRAINER_PATHS:
        cfg = config(args, side, cache, on_device, home)
        rate, warm = through_trainer(args, manifest, constructor, cfg, precision)
        rows.append(Row(name, constructor, side, path, rate, rate / rows[0].images_per_s, warm))
        print(row(rows[-1]), flush=True)
    return rows


def ddp_rows(args, rows: list[Row], folder: Path, scratch: Path, deadline: float) -> list[Row]:
    """The DDP row for the first model type, when asked and the GPUs are there."""
    if args.devices < 2 or not rows:
        return []
    present = torch.cuda.device_count() if args.device == "cuda" else 0
    if present < args.devices:
        print(f"ddp-{args.devices}: skipped, {present} GPUs present, {args.devices} needed")
        return []
    first = rows[0]
    limit = max(deadline - time.perf_counter(), 60.0)
    rate, problem = ddp_rate(args, first.model_type, first.input, folder, scratch, limit)
    if problem:
        print(f"ddp-{args.devices}: not measured ({problem})")
    ratio = rate / (args.devices * first.images_per_s) if rate else None
    ddp = Row(
        first.model_type, first.network, first.input, f"ddp-{args.devices}", rate, ratio, None
    )
    print(row(ddp), flush=True)
    return [ddp]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return "CPU"


def header(args, device: str, precision: str, channels_last: bool, kb: float, began: float) -> str:
    return (
        f"device: {device}, {os.cpu_count()} CPU cores; torch {torch.__version__}, "
        f"lightning {pl.__version__}; {precision}, channels_last {channels_last}, "
        f"compile {args.compile}, batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup} warm-up steps\ndata: {args.images} JPEGs of {kb:.0f} KB (640x480), "
        f"written and listed in {time.perf_counter() - began:.0f} s; jpeg: {args.workers} "
        f"decoding workers; cache-host: reader threads {args.cache_workers}"
    )


def settings(args, precision: str) -> dict[str, Any]:
    keys = ("images", "batch_size", "steps", "warmup", "workers", "cache_workers", "compile")
    return {**{key: getattr(args, key) for key in keys}, "precision": precision}


COLUMNS = (
    f"{'model type':<24} {'network':<19} {'input':>5}  {'path':<13} {'images/s':>9} "
    f"{'vs ceiling':>10} {'warm-up s':>9}"
)


def row(r: Row) -> str:
    def number(value: float | None, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    return (
        f"{r.model_type:<24} {r.network:<19} {r.input:>5}  {r.path:<13} "
        f"{number(r.images_per_s, '.0f'):>9} {number(r.vs_ceiling, '.2f'):>10} "
        f"{number(r.warmup_s, '.1f'):>9}"
    )


def table(rows: list[Row]) -> str:
    lines = ["images/s", COLUMNS, *(row(r) for r in rows)]
    device = [r for r in rows if r.path == "cache-device" and r.model_type.startswith("mobile")]
    if device:
        met = all((r.vs_ceiling or 0) >= 0.8 for r in device)
        lines.append(f"target cache-device >= 0.8 ceiling, every mobile type: "
                     f"{'met' if met else 'NOT met'}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
