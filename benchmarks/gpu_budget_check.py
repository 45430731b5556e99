"""A budgeted training on whatever accelerator is present: does the budget hold, how fast is it?

Trains the demo dataset's TRAIN split with the trainer's LightningModule and budget callback
(no Hydra, no MLflow, so it runs on a bare GPU machine with torch, Lightning and torchmetrics),
under a budget in milli-node-hours, with the given precision. Prints the steps trained, the
images/s, and the cost against the budget, measured as the trainer measures it.

    python benchmarks/gpu_budget_check.py --budget 10 --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch

from budgets import BudgetMeter
from budgets.callback import BudgetStopping
from trainer.data.images import LabelledImages, eval_transform, make_loader, train_transform
from trainer.data.manifest import TRAIN, VALIDATE, read_dataset
from trainer.tasks.image_classification.demo import ensure_demo_dataset
from trainer.tasks.image_classification.module import ImageClassifier
from trainer.tasks.image_classification.networks import build_backbone

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=10, help="milli-node-hours")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--constructor", default="mobilenet_v3_small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    meter = BudgetMeter(args.budget)
    meter.start()
    with tempfile.TemporaryDirectory() as home:
        manifest = read_dataset(ensure_demo_dataset(home))
        size = [args.size, args.size]
        train = LabelledImages(
            manifest.split(TRAIN), manifest.labels,
            train_transform(size, MEAN, STD, [0.6, 1.0], True),
        )  # fmt: skip
        val = LabelledImages(
            manifest.split(VALIDATE), manifest.labels, eval_transform(size, MEAN, STD)
        )
        train_loader = make_loader(train, args.batch_size, args.workers, True, seed=0)
        val_loader = make_loader(val, args.batch_size, args.workers, False, seed=0)
        classes = len(manifest.labels)
        module = ImageClassifier(
            build_backbone(args.constructor, classes, False), classes, 2e-3, 1e-4
        ).to(memory_format=torch.channels_last)
        budget = BudgetStopping(meter, final_eval_batches=len(val_loader), save_seconds=1.0)
        trainer = pl.Trainer(
            accelerator="auto", devices=1, precision=args.precision, max_epochs=-1,
            callbacks=[budget], logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=1,
            default_root_dir=Path(home),
        )  # fmt: skip
        started = time.monotonic()
        trainer.fit(module, train_loader, val_loader)
        fit_seconds = time.monotonic() - started
        results = trainer.validate(module, val_loader, verbose=False)[0]
    images = budget.steps_done * args.batch_size
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"torch {torch.__version__}, lightning {pl.__version__}, precision {args.precision}")
    print(f"{args.constructor} at {args.size}px, batch {args.batch_size}, {args.workers} workers")
    rate = images / fit_seconds
    print(f"steps {budget.steps_done}, epochs {trainer.current_epoch}, ~{rate:.0f} images/s")
    warmup = ", ".join(f"{t:.2f}" for t in budget.step.warmup_seconds)
    print(f"first step {warmup} s; steady step estimate {budget.step.estimate():.3f} s")
    print(f"validation accuracy {results['val_accuracy']:.3f}")
    print(f"stopped by budget: {budget.stopped_by_budget}; "
          f"cost {meter.cost_milli_node_hours()} of {args.budget} milli-node-hours")  # fmt: skip
    assert meter.cost_milli_node_hours() <= args.budget


if __name__ == "__main__":
    main()
