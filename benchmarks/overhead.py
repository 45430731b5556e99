"""Seconds per training step through the trainer's module and callbacks vs a plain PyTorch loop.

Same backbone, same data loader, same batch size, same number of steps. A step is timed from
the previous step's end to its own end within an epoch (batch loading included); the work at
epoch boundaries (checkpointing, validation) is product work, not per-step overhead, and is left
out of both. Runs alternate
(trainer, plain, trainer, plain, ...) because epoch times on small VMs swing between phases;
the figures are the medians over the rounds. Target: ratio <= 1.05 on CPU.

    .venv/bin/python benchmarks/overhead.py [--steps 60] [--rounds 3] [--model-type ...]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import OmegaConf
from torch.nn import functional as F

from budgets import BudgetMeter
from budgets.callback import BudgetStopping
from trainer import CONF_DIR
from trainer.data.images import LabelledImages, make_loader, train_transform
from trainer.data.manifest import TRAIN, read_dataset
from trainer.job.checkpoints import CancelWatch, SafetyCheckpoints, StopRequest
from trainer.job.progress import ProgressReport
from trainer.store.store import Store
from trainer.tasks.image_classification.demo import ensure_demo_dataset
from trainer.tasks.image_classification.module import ImageClassifier
from trainer.tasks.image_classification.networks import build_backbone

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


class StepTimes:
    """Seconds of each step after warm-up, from the previous step's end within an epoch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.seconds = warmup, 0, []
        self._last_end: float | None = None

    def step_ended(self, batch_idx: int) -> None:
        now = time.perf_counter()
        if batch_idx > 0 and self._last_end is not None and self.steps >= self.warmup:
            self.seconds.append(now - self._last_end)
        self._last_end = now
        self.steps += 1

    def mean(self) -> float:
        return statistics.fmean(self.seconds)


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.times = StepTimes(warmup)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.step_ended(batch_idx)


def through_trainer(cfg, loader, classes: int, steps: int, warmup: int, root: Path) -> float:
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.constructor, classes, pretrained=None)
    module = ImageClassifier(backbone, classes, cfg.optimizer.lr, cfg.optimizer.weight_decay)
    budget = BudgetStopping(BudgetMeter(10**6), final_eval_batches=1, save_seconds=1.0)
    timer = StepTimer(warmup)
    store = Store(f"sqlite:///{root / 'mlflow.db'}", "overhead")
    run_id = store.start_run("overhead", {}, {})
    stop = StopRequest()
    callbacks = [
        CancelWatch(lambda: store.cancel_requested(run_id), 2.0, stop),  # as in training
        SafetyCheckpoints(root, every_minutes=10, stop=stop),
        budget,
        ModelCheckpoint(dirpath=root, save_last=True),
        ProgressReport(budget, "val_accuracy", lambda fraction: None),
        EarlyStopping(monitor="train_loss", patience=10**6, check_on_train_epoch_end=True),
        timer,
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps + warmup,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=MLFlowLogger(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", run_id=run_id),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, loader)
    return timer.times.mean()


def plain_loop(cfg, loader, classes: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = build_backbone(cfg.model.constructor, classes, pretrained=None)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay
    )
    model.train()
    times = StepTimes(warmup)
    while times.steps < steps + warmup:
        for batch_idx, (images, targets) in enumerate(loader):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), targets).backward()
            optimizer.step()
            times.step_ended(batch_idx)
            if times.steps == steps + warmup:
                break
    return times.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", default="mobile-low-latency-1")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=64)
    args = parser.parse_args()

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", [f"model_type={args.model_type}"])
    home = Path(OmegaConf.to_container(cfg, resolve=True)["home"])
    manifest = read_dataset(ensure_demo_dataset(home))
    size = [args.input_size, args.input_size]
    transform = train_transform(
        size, cfg.data.mean, cfg.data.std, cfg.data.crop_scale, cfg.data.horizontal_flip
    )
    dataset = LabelledImages(manifest.split(TRAIN), manifest.labels, transform)
    loader = make_loader(dataset, cfg.data.batch_size, cfg.data.num_workers, True, seed=0)
    classes = len(manifest.labels)

    print(
        f"{cfg.model.constructor} at {args.input_size}px, batch {cfg.data.batch_size}, "
        f"{args.steps} steps after {args.warmup} warm-up, {torch.get_num_threads()} threads"
    )
    trainer_times, plain_times = [], []
    with tempfile.TemporaryDirectory() as root:
        for round_index in range(args.rounds):
            trainer_times.append(
                through_trainer(cfg, loader, classes, args.steps, args.warmup, Path(root))
            )
            plain_times.append(plain_loop(cfg, loader, classes, args.steps, args.warmup))
            print(
                f"round {round_index + 1}: trainer {trainer_times[-1]:.4f} s/step, "
                f"plain {plain_times[-1]:.4f} s/step"
            )
    trainer_s, plain_s = statistics.median(trainer_times), statistics.median(plain_times)
    print(f"trainer module + callbacks: {trainer_s:.4f} s/step (median)")
    print(f"plain PyTorch loop:         {plain_s:.4f} s/step (median)")
    print(f"ratio: {trainer_s / plain_s:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
