"""What a budget buys: the trainer with its defaults against a plain PyTorch loop.

Four datasets, each at budgets of 10, 20 and 60 milli-node-hours by default:

- ``shapes``: generated 32 px shapes and patterns (classification, 6 labels);
- ``digits``: scikit-learn's 1,797 real scanned handwritten digits at their own size, 8x8
  (classification, 10 labels; shipped inside the package, no download);
- ``detection``: the generated detection demo's shapes at 128 px (object detection);
- ``multilabel``: 400 generated 64 px images of one to three solid shapes each (MULTILABEL
  classification, 4 labels); the plain loop trains a sigmoid per label with binary
  cross-entropy, and both are scored by the micro-averaged average precision of TEST
  (AutoML's auPrc), with the exact label-set match at 0.5 beside it.

The trainer runs as a user runs it, ``python -m trainer dataset.path=... `` with every default
(``model.input_size=auto``, ``data.cache=auto``, ``model.pretrained=auto``; there are no
weights in this benchmark's torch hub cache, so both sides train from scratch), in a fresh home
and store per dataset: the first training of a home pays for what a first training pays. The
plain loop is what a careful user would write with the same network, transforms and optimizer,
at the best resolution for the data, given the same wall-clock seconds (budget x 3.6) for
everything after its imports: reading the dataset, training with room kept for its test pass,
and testing. Figures: TEST accuracy (mAP for detection) of each; the trainer's cost, stop
reason, utilization (its cost / the budget, as issue 17 measured it; and billed seconds / the
budget's seconds, before rounding up) and fixed seconds (its set-up phases
from metrics.json, and recording the model after the TEST pass). Runs are interleaved per cell,
since epoch times on small VMs swing between phases.

Each repeat draws its own seed (42, 43, ...), the same for both sides: a plain loop with a
constant rate and a fixed seed is one trajectory, and a cell decided on one draw of each side
says which was luckier, not which is better.

Targets (issue 17): the trainer >= the plain loop in every cell (by the medians of the
scores, with ``--repeats``); utilization >= 0.95 at 20 milli-node-hours and above for a
training that stopped BUDGET_REACHED.

    .venv/bin/python benchmarks/time_to_accuracy.py [--datasets shapes digits detection multilabel]
        [--budgets 10 20 60] [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.data.images import LabelledImages, eval_transform, make_loader, train_transform  # noqa: E402
from trainer.data.manifest import TEST, TRAIN, read_dataset  # noqa: E402
from trainer.tasks.image_classification.demo import (  # noqa: E402
    write_digits,
    write_multilabel_shapes,
    write_shapes,
)
from trainer.tasks.image_classification.networks import build_backbone  # noqa: E402

# The trainer's defaults (conf/), which the plain loops use too.
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LR, WEIGHT_DECAY, BATCH, SEED, CROP = 2e-3, 1e-4, 32, 42, [0.6, 1.0]
CLASSIFIER = "mobilenet_v3_small"  # image classification's default type
DETECTOR, DETECTION_SIZE, DETECTION_BATCH = "ssdlite320_mobilenet_v3_large", 320, 8


def write_detection(folder: Path) -> Path:
    from trainer.tasks.object_detection.demo import write_detection_shapes

    return write_detection_shapes(folder, 300, 128, seed=0)


# -- the trainer -----------------------------------------------------------------------------


def through_trainer(
    budget: int, dataset: Path, root: Path, name: str, *overrides: str, seed: int,
    holdout: Path | None = None,
) -> dict:  # fmt: skip
    run_dir = root / "runs" / f"{name}_{budget}"
    command = [
        sys.executable, "-m", "trainer", f"dataset.path={dataset}",
        "budget.min_milli_node_hours=1", f"budget.train_budget_milli_node_hours={budget}",
        f"display_name=tta_{name}_{budget}", f"hydra.run.dir={run_dir}", f"seed={seed}",
        *overrides,
    ]  # fmt: skip
    environment = {
        **os.environ,
        "VISION_TRAINER_HOME": str(root / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "TORCH_HOME": str(root / "torch"),  # empty: both sides train from scratch
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        command, cwd=root, env=environment, capture_output=True, text=True, timeout=3600
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:70]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = json.loads((run_dir / "model.json").read_text())
    meta = next(value for key, value in model.items() if key.endswith("ModelMetadata"))
    spent = json.loads((run_dir / "state.json").read_text())["spent_seconds"]
    recorded = re.search(r"recorded the model in [\d.]+ s \(([\d.]+) s after", done.stderr)
    size = re.search(r"model.input_size=auto: (\d+x\d+)", done.stderr)
    return {
        "score": next(
            metrics[k] for k in ("test_accuracy", "test_map", "test_auprc") if k in metrics
        ),
        "exact_match": metrics.get("test_exact_match"),
        "cost": int(meta["trainCostMilliNodeHours"]),
        "stop": meta["stopReason"],
        "epochs": metrics["epochs"],
        "utilization": int(meta["trainCostMilliNodeHours"]) / budget,
        "billed": spent / (budget * 3.6),
        "setup": sum(metrics.get("setupSeconds", {}).values()),
        "recording": float(recorded.group(1)) if recorded else float("nan"),
        "size": size.group(1) if size else "?",
        "holdout": trainer_holdout(run_dir, holdout),
    }


# -- plain loops -----------------------------------------------------------------------------


def deadline_loop(
    limit: float, started: float, batches: Callable[[], object], step: Callable[[object], None],
    test_batches: int,
) -> int:  # fmt: skip
    """Train until the next step and a test pass (at most a step per test batch) would not
    fit in ``limit`` seconds, as a careful user with a deadline would; return whole epochs."""
    recent: list[float] = []  # step seconds, the first (cold) one left out once others exist
    epochs = 0
    while True:
        for batch in batches():
            room = 1.25 * max(recent[-5:], default=0.0) * (1 + test_batches)
            if time.monotonic() - started + room > limit:
                return epochs
            step_started = time.monotonic()
            step(batch)
            recent = [*recent[1 if len(recent) == 1 else 0 :], time.monotonic() - step_started]
        epochs += 1


def holdout_accuracy(network: torch.nn.Module, holdout: Path | None, input_size: list) -> float:
    """Accuracy on a large extra set from the same generator: the 56-image TEST split of the
    shapes moves by 0.04 between runs that a 1,200-image hold-out tells apart."""
    if holdout is None:
        return float("nan")
    manifest = read_dataset(holdout)
    images = [item for split in (TRAIN, "VALIDATE", TEST) for item in manifest.split(split)]
    data = LabelledImages(images, manifest.labels, eval_transform(input_size, MEAN, STD))
    correct = 0
    network.eval()
    with torch.no_grad():
        for batch, targets in make_loader(data, 128, 0, False, SEED):
            correct += int((network(batch).argmax(1) == targets).sum())
    return correct / len(data)


def trainer_holdout(run_dir: Path, holdout: Path | None) -> float:
    """The hold-out accuracy of the model the trainer recorded (its best checkpoint), at the
    input size it settled on."""
    if holdout is None:
        return float("nan")
    size = json.loads((run_dir / "state.json").read_text())["config"]["model"]["input_size"]
    network = build_backbone(CLASSIFIER, len(read_dataset(holdout).labels), None)
    checkpoint = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    prefix = "backbone."
    weights = checkpoint["state_dict"].items()
    network.load_state_dict({k[len(prefix) :]: v for k, v in weights if k.startswith(prefix)})
    return holdout_accuracy(network, holdout, size)


def plain_classification(
    budget: int, folder: Path, input_size: int, flip: bool, *, seed: int,
    holdout: Path | None = None, multilabel: bool = False,
) -> dict:  # fmt: skip
    """The plain loop: cross-entropy and TEST accuracy, or for a MULTILABEL dataset a sigmoid
    per label (binary cross-entropy) and TEST's micro-averaged auPrc and exact match."""
    started = time.monotonic()
    torch.manual_seed(seed)
    manifest = read_dataset(folder)
    size, labels = [input_size, input_size], manifest.labels
    augment = train_transform(size, MEAN, STD, CROP, flip)
    train = LabelledImages(manifest.split(TRAIN), labels, augment, multilabel)
    test = LabelledImages(manifest.split(TEST), labels, eval_transform(size, MEAN, STD), multilabel)
    train_loader = make_loader(train, BATCH, 0, True, seed)
    test_loader = make_loader(test, BATCH, 0, False, seed)
    model = build_backbone(CLASSIFIER, len(labels), None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    loss = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy

    def step(batch) -> None:
        images, targets = batch
        optimizer.zero_grad(set_to_none=True)
        loss(model(images), targets).backward()
        optimizer.step()

    model.train()
    epochs = deadline_loop(budget * 3.6, started, lambda: train_loader, step, len(test_loader))
    scores = scores_on_test(model, test_loader, len(labels), multilabel)
    return {
        **scores, "seconds": time.monotonic() - started, "epochs": epochs,
        "holdout": holdout_accuracy(model, holdout, size),
    }  # fmt: skip


def scores_on_test(model: torch.nn.Module, loader, labels: int, multilabel: bool) -> dict:
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MultilabelAveragePrecision,
        MultilabelExactMatch,
    )

    if multilabel:
        metrics = MetricCollection({
            "score": MultilabelAveragePrecision(num_labels=labels, average="micro"),
            "exact_match": MultilabelExactMatch(num_labels=labels),
        })  # fmt: skip
    else:
        metrics = MetricCollection({"score": MulticlassAccuracy(labels, average="micro")})
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            logits = model(images)
            if multilabel:
                metrics.update(logits.sigmoid(), targets.long())
            else:
                metrics.update(logits, targets)
    return {name: float(value) for name, value in metrics.compute().items()}


def plain_detection(budget: int, csv: Path, input_size: int, *, seed: int) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    from trainer.tasks.object_detection.data import read_detection_dataset
    from trainer.tasks.object_detection.images import (
        DetectionImages,
        detection_eval_transform,
        detection_train_transform,
        make_detection_loader,
    )
    from trainer.tasks.object_detection.networks import build_detector

    started = time.monotonic()
    torch.manual_seed(seed)
    manifest = read_detection_dataset(csv)
    size = (input_size, input_size)
    train = DetectionImages(
        manifest.split(TRAIN), manifest.labels, detection_train_transform(size, True)
    )
    test = DetectionImages(manifest.split(TEST), manifest.labels, detection_eval_transform(size))
    train_loader = make_detection_loader(train, DETECTION_BATCH, 0, True, seed)
    test_loader = make_detection_loader(test, DETECTION_BATCH, 0, False, seed)
    model = build_detector(DETECTOR, len(manifest.labels), size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def plain(target: dict) -> dict:
        return {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}

    def step(batch) -> None:
        images, targets = batch
        optimizer.zero_grad(set_to_none=True)
        losses = model(list(images), [plain(t) for t in targets])
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()

    model.train()
    epochs = deadline_loop(budget * 3.6, started, lambda: train_loader, step, len(test_loader))
    metric = MeanAveragePrecision(box_format="xyxy", backend="pycocotools")
    model.eval()
    with torch.no_grad():
        for images, targets in test_loader:
            metric.update(model(list(images)), [plain(t) for t in targets])
    score = float(metric.compute()["map"])
    return {"score": score, "seconds": time.monotonic() - started, "epochs": epochs}


# -- the table -------------------------------------------------------------------------------


def trainer_cell(result: dict) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    stop = "conv" if result["stop"] == "MODEL_CONVERGED" else "budg"
    return (
        f"{result['score']:.3f} {result['size']:>7} {result['cost']:>3} mnh {stop} "
        f"util {result['utilization']:.2f} (s {result['billed']:.3f}) "
        f"set-up {result['setup']:.1f} s "
        f"rec {result['recording']:.1f} s {result['epochs']:>3} ep"
    )


def exact_text(trained: dict, baseline: dict) -> str:
    if trained.get("exact_match") is None:
        return ""
    return (f" | exact match: trainer {trained['exact_match']:.3f}, "
            f"plain {baseline['exact_match']:.3f}")  # fmt: skip


def holdout_text(trained: dict, baseline: dict) -> str:
    if "holdout" not in trained or trained["holdout"] != trained["holdout"]:  # absent or NaN
        return ""
    return f" | hold-out: trainer {trained['holdout']:.3f}, plain {baseline['holdout']:.3f}"


def dataset(name: str, root: Path) -> tuple[Path, Path | None, tuple[str, ...], Callable]:
    """The dataset's folder (or CSV), its hold-out (shapes only), the trainer's overrides and
    the plain loop for it."""
    if name == "shapes":
        data, holdout = root / "shapes", root / "holdout"
        write_shapes(data, 100, 32, seed=11)
        write_shapes(holdout, 200, 32, seed=99)
        plain = partial(plain_classification, folder=data, input_size=32, flip=True)
        return data, holdout, (), partial(plain, holdout=holdout)
    if name == "digits":
        data = root / "digits"
        write_digits(data)
        # A mirrored digit is another glyph: a user of this dataset turns flips off.
        plain = partial(plain_classification, folder=data, input_size=32, flip=False)
        return data, None, ("data.horizontal_flip=false",), plain
    if name == "multilabel":
        data = write_multilabel_shapes(root / "multilabel", 400, 64, seed=3)
        plain = partial(
            plain_classification, folder=data, input_size=64, flip=True, multilabel=True
        )
        return data, None, (), plain
    data = write_detection(root / "detection")
    plain = partial(plain_detection, csv=data, input_size=DETECTION_SIZE)
    return data, None, ("task=object_detection",), plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--datasets", nargs="+", default=["shapes", "digits", "detection", "multilabel"]
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 60])
    parser.add_argument("--threads", type=int, help="torch threads for every run")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="run every dataset's budgets this many times, each time in a fresh home and store "
        "and with its own seed; cells compare the medians (a 56-image TEST split moves by 2 "
        "images between runs)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the trainer's processes inherit it
        torch.set_num_threads(args.threads)

    cells: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.datasets:
            (Path(scratch) / name).mkdir()
            data, holdout, overrides, plain = dataset(name, Path(scratch) / name)
            for repeat in range(args.repeats):
                root = Path(scratch) / name / f"run{repeat}"  # a fresh home and store
                root.mkdir()
                seed = SEED + repeat
                for budget in args.budgets:
                    trained = through_trainer(
                        budget, data, root, name, *overrides, seed=seed, holdout=holdout
                    )
                    baseline = plain(budget, seed=seed)
                    cells.setdefault((name, budget), []).append((trained, baseline))
                    print(f"{name:>9} {budget:>3} mnh seed {seed} | trainer "
                          f"{trainer_cell(trained)} | plain "
                          f"{baseline['score']:.3f} {baseline['epochs']} ep"
                          f"{holdout_text(trained, baseline)}"
                          f"{exact_text(trained, baseline)}", flush=True)  # fmt: skip
    print()
    met = {"accuracy": True, "utilization": True}
    heading = "trainer (score, input, cost, stop, utilization, fixed seconds, epochs)"
    print(f"{'dataset':>9} {'budget':>7}  {heading:<96}  plain loop")
    for (name, budget), runs in cells.items():
        for trained, baseline in runs:
            plain_text = f"{baseline['score']:.3f} in {baseline['seconds']:.1f} s"
            plain_text += f", {baseline['epochs']} ep{holdout_text(trained, baseline)}"
            plain_text += exact_text(trained, baseline)
            print(f"{name:>9} {budget:>3} mnh  {trainer_cell(trained):<96}  {plain_text}")
            if "error" not in trained and budget >= 20 and trained["stop"] == "BUDGET_REACHED":
                met["utilization"] &= trained["utilization"] >= 0.95
        if any("error" in trained for trained, _ in runs):
            met["accuracy"] = False
            continue
        ours = statistics.median([trained["score"] for trained, _ in runs])
        theirs = statistics.median([baseline["score"] for _, baseline in runs])
        met["accuracy"] &= ours >= theirs
        if len(runs) > 1:
            print(f"{name:>9} {budget:>3} mnh  median of {len(runs)}: trainer {ours:.3f}, "
                  f"plain {theirs:.3f}")  # fmt: skip
    for target, ok in met.items():
        print(f"target {target}: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
