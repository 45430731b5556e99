"""Test accuracy reached within a budget: the trainer against a plain PyTorch loop.

On a generated dataset (the demo's shapes and patterns, more and larger images), for budgets of
2, 5, 10 and 20 milli-node-hours: the trainer through ``python -m trainer`` with the
decoded-image cache, without it, and with the cache and ``budget.disable_early_stopping=true``
(which spends the whole budget, as the plain loop does), and a plain PyTorch loop given the same
wall-clock seconds (budget x 3.6) for everything it does after its imports: reading the dataset,
training, and testing. The trainer's figure is the TEST accuracy of the model it records; the
plain loop's is the TEST accuracy of its last weights. Runs are interleaved per budget, since
epoch times on small VMs swing between phases. Target: the trainer reaches at least the plain
loop's accuracy at every budget.

The MLflow store is created before the first run, as a user's store already exists; the cache
is not, so the first cached training pays for its build. Budgets run largest first: the first
training in a home keeps ``budget.save_reserve_first_seconds`` (20 s) for recording its model,
more than the smaller budgets hold, and later ones what this machine's recordings took
(``budget.save_reserve_seconds=auto``).

    .venv/bin/python benchmarks/time_to_accuracy.py [--budgets 20 10 5 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.data.images import LabelledImages, eval_transform, make_loader, train_transform  # noqa: E402
from trainer.data.manifest import TEST, TRAIN, read_dataset  # noqa: E402
from trainer.tasks.image_classification.demo import write_shapes  # noqa: E402
from trainer.tasks.image_classification.networks import build_backbone  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# The trainer's defaults (conf/), which the plain loop uses too.
NO_EARLY_STOPPING = "budget.disable_early_stopping=true"
CONSTRUCTOR, LR, WEIGHT_DECAY, BATCH, SEED = "mobilenet_v3_small", 2e-3, 1e-4, 32, 42


def through_trainer(budget: int, cache: str, args, root: Path, *overrides: str) -> dict:
    run_dir = root / "runs" / f"{budget}_{cache}_{len(overrides)}"
    command = [
        sys.executable, "-m", "trainer", f"dataset.path={args.folder}",
        f"model.input_size=[{args.input_size},{args.input_size}]",
        "budget.min_milli_node_hours=1", f"budget.train_budget_milli_node_hours={budget}",
        f"data.cache={cache}", f"display_name=tta_{budget}_{cache}", f"hydra.run.dir={run_dir}",
        *overrides,
    ]  # fmt: skip
    environment = {
        **os.environ,
        "VISION_TRAINER_HOME": str(root / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        command, cwd=root, env=environment, capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:70]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    meta = json.loads((run_dir / "model.json").read_text())["imageClassificationModelMetadata"]
    return {
        "accuracy": metrics["test_accuracy"],
        "cost": int(meta["trainCostMilliNodeHours"]),
        "stop": meta["stopReason"],
        "epochs": metrics["epochs"],
        "build": metrics.get("cacheBuildSeconds", 0.0),
    }


def plain_loop(budget: int, args) -> dict:
    """What a user would write: DataLoaders with the same transforms, AdamW, then a test."""
    limit = budget * 3.6
    started = time.monotonic()
    torch.manual_seed(SEED)
    manifest = read_dataset(args.folder)
    size = [args.input_size, args.input_size]
    augment = train_transform(size, MEAN, STD, [0.6, 1.0], True)
    train = LabelledImages(manifest.split(TRAIN), manifest.labels, augment)
    test = LabelledImages(manifest.split(TEST), manifest.labels, eval_transform(size, MEAN, STD))
    train_loader = make_loader(train, BATCH, 0, True, SEED)
    test_loader = make_loader(test, BATCH, 0, False, SEED)
    model = build_backbone(CONSTRUCTOR, len(manifest.labels), pretrained=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    recent: list[float] = []  # step seconds, the first (cold) one left out once others exist
    epochs, out_of_time = 0, False
    while not out_of_time:
        model.train()
        for images, targets in train_loader:
            # Keep room for the next step and a test pass (forward only, so at most a step
            # per batch), as a careful user with a deadline would.
            step = 1.25 * max(recent[-5:], default=0.0)
            if time.monotonic() - started + step * (1 + len(test_loader)) > limit:
                out_of_time = True
                break
            step_started = time.monotonic()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), targets).backward()
            optimizer.step()
            recent = [*recent[1 if len(recent) == 1 else 0 :], time.monotonic() - step_started]
        else:
            epochs += 1
    correct = 0
    model.eval()
    with torch.no_grad():
        for images, targets in test_loader:
            correct += int((model(images).argmax(1) == targets).sum())
    return {
        "accuracy": correct / len(test),
        "seconds": time.monotonic() - started,
        "epochs": epochs,
    }


def create_store(root: Path) -> None:
    script = "import mlflow, sys; mlflow.MlflowClient(sys.argv[1]).search_experiments()"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    subprocess.run([sys.executable, "-c", script, uri], check=True, capture_output=True)


def trainer_cell(result: dict) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    text = f"{result['accuracy']:.3f}  {result['cost']:>3} mnh  {result['epochs']:>2} ep  "
    text += "conv" if result["stop"] == "MODEL_CONVERGED" else "budg"
    return text + (f"  (build {result['build']:.1f} s)" if result["build"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 10, 5, 2])
    parser.add_argument("--per-label", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, help="torch threads for every run (1 on a CPU shared with others)"
    )
    args = parser.parse_args()
    if args.threads:
        # Set before any run: the trainer's processes inherit it, the plain loop runs here.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        args.folder = root / "shapes"
        write_shapes(args.folder, args.per_label, args.image_size, seed=11)
        create_store(root)
        manifest = read_dataset(args.folder)
        counts = manifest.counts()
        print(
            f"{CONSTRUCTOR} at {args.input_size}px on {len(manifest.items)} generated images "
            f"({len(manifest.labels)} labels; train {counts[TRAIN]}, test {counts[TEST]}), "
            f"batch {BATCH}, {torch.get_num_threads()} threads",
            flush=True,
        )
        rows = []
        for budget in args.budgets:
            cached = through_trainer(budget, "on", args, root)
            uncached = through_trainer(budget, "off", args, root)
            spending = through_trainer(budget, "on", args, root, NO_EARLY_STOPPING)
            plain = plain_loop(budget, args)
            rows.append((budget, cached, uncached, spending, plain))
            print(f"{budget} mnh: cache {trainer_cell(cached)} | no cache {trainer_cell(uncached)} "
                  f"| no early stop {trainer_cell(spending)} | plain {plain['accuracy']:.3f}",
                  flush=True)  # fmt: skip
    print()
    print(table(rows))


def table(rows: list[tuple]) -> str:
    lines = [
        f"{'budget':>6}  {'trainer, data.cache=on':<42}  {'data.cache=off':<30}  "
        f"{'data.cache=on, no early stopping':<34}  plain loop (same seconds)"
    ]
    for budget, cached, uncached, spending, plain in sorted(rows, key=lambda r: r[0]):
        plain_text = f"{plain['accuracy']:.3f}  {plain['seconds']:.1f} s  {plain['epochs']} ep"
        lines.append(f"{budget:>4} mnh  {trainer_cell(cached):<42}  {trainer_cell(uncached):<30}  "
                     f"{trainer_cell(spending):<34}  {plain_text}")  # fmt: skip
    for column, name in ((1, "defaults"), (3, "no early stopping")):
        met = all(
            "error" not in row[column] and row[column]["accuracy"] >= row[4]["accuracy"]
            for row in rows
        )
        verdict = "met" if met else "NOT met"
        lines.append(f"target (trainer, {name}, >= plain loop at every budget): {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
