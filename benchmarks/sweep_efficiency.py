"""What a sweep's budget buys: successive halving against random search and one long training.

On generated 32 px shapes (6 labels), the same total budget B spent three ways, each as a user
runs it (``python -m trainer``), in one home and store:

- (a) this sweep, ``hydra/sweeper=budgeted`` with successive halving (TPE, rungs of
  ``--min-rung`` x 3 up to ``--max-rung``), ``--parallel`` trials at once;
- (b) random search through the same sweeper with equal grants: ``sweep.sampler=random
  sweep.pruning=none``, every trial granted ``--grant``;
- (c) one training with the defaults given the whole budget.

Each row prints the TEST accuracy of the model the row chose (a sweep's best by its validation
metric; a hold-out of 1,200 images from the same generator as well, since the TEST split is 56
images), the trials run and the sum of their costs against B. Targets (issue 13): (a) >= (b)
and (a) >= (c), and the sum of costs <= B in every row.

    .venv/bin/python benchmarks/sweep_efficiency.py [--budget 150] [--min-rung 10]
        [--max-rung 90] [--grant 30] [--parallel 1]

On a 2-core machine one trial at a time: two at once halve each trial's cores, and at 8
milli-node-hours a trial then trained too little to rank (72 milli-node-hours, 2 at once: most
first-rung trials at chance, some too small to train a step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from time_to_accuracy import trainer_holdout  # noqa: E402

from trainer.tasks.image_classification.demo import write_shapes  # noqa: E402

SPACE = ["optimizer.lr=tag(log,interval(3e-4,2e-2))", "data.batch_size=choice(16,32,64)",
         "optimizer.weight_decay=tag(log,interval(1e-5,1e-2))"]  # fmt: skip


def environment(root: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))},
        "VISION_TRAINER_HOME": str(root / "home"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "TORCH_HOME": str(root / "torch"),  # empty: from scratch, as time_to_accuracy.py
        "PYTHONPATH": str(REPO),
    }


def trainer(root: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=root, env=environment(root),
        capture_output=True, text=True, timeout=7200,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"python -m trainer {' '.join(args[:3])} ...: {done.stderr[-2000:]}")
    return done


def sweep_row(root: Path, data: Path, holdout: Path, budget: int, *settings: str) -> dict:
    started = time.monotonic()
    done = trainer(
        root, "-m", "hydra/sweeper=budgeted", f"dataset.path={data}",
        "budget.min_milli_node_hours=1", f"sweep.budget_milli_node_hours={budget}", *settings,
        *SPACE,
    )  # fmt: skip
    sweep_id = done.stdout.split()[0]
    sweep = json.loads(trainer(root, "sweeps", "get", sweep_id, "--json").stdout)
    best = next(t for t in sweep["trials"] if t["model"] == sweep["bestModelId"])
    run_dir = Path(best["run_dir"])
    return {
        "test": json.loads((run_dir / "metrics.json").read_text())["test_accuracy"],
        "holdout": trainer_holdout(run_dir, holdout),
        "trials": len(sweep["trials"]),
        "rungs": max(t["rung"] for t in sweep["trials"]) + 1,
        "cost": int(sweep["costMilliNodeHours"]),
        "seconds": time.monotonic() - started,
    }


def single_row(root: Path, data: Path, holdout: Path, budget: int) -> dict:
    started = time.monotonic()
    run_dir = root / "runs" / "single"
    budget_key = f"budget.train_budget_milli_node_hours={budget}"
    trainer(root, f"dataset.path={data}", "budget.min_milli_node_hours=1", budget_key,
            f"hydra.run.dir={run_dir}")  # fmt: skip
    model = json.loads((run_dir / "model.json").read_text())
    meta = next(v for k, v in model.items() if k.endswith("ModelMetadata"))
    return {
        "test": json.loads((run_dir / "metrics.json").read_text())["test_accuracy"],
        "holdout": trainer_holdout(run_dir, holdout),
        "trials": 1,
        "rungs": 1,
        "cost": int(meta["trainCostMilliNodeHours"]),
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=150)
    parser.add_argument("--min-rung", type=int, default=10)
    parser.add_argument("--max-rung", type=int, default=90)
    parser.add_argument("--grant", type=int, default=30, help="(b)'s equal grant per trial")
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data, holdout = root / "shapes", root / "holdout"
        write_shapes(data, 100, 32, seed=11)
        write_shapes(holdout, 200, 32, seed=99)
        parallel = f"sweep.parallel={args.parallel}"
        rows = {
            "(a) successive halving": sweep_row(
                root,
                data,
                holdout,
                args.budget,
                parallel,
                f"sweep.min_trial_milli_node_hours={args.min_rung}",
                "sweep.reduction_factor=3",
                f"sweep.max_trial_milli_node_hours={args.max_rung}",
            ),  # fmt: skip
            "(b) random, equal grants": sweep_row(
                root,
                data,
                holdout,
                args.budget,
                parallel,
                "sweep.sampler=random",
                "sweep.pruning=none",
                f"sweep.min_trial_milli_node_hours={args.grant}",
                f"sweep.max_trial_milli_node_hours={args.grant}",
            ),  # fmt: skip
            "(c) one training": single_row(root, data, holdout, args.budget),
        }
    seconds = args.budget * 3.6
    print(f"generated shapes, 6 labels, 32 px; budget {args.budget} milli-node-hours per row "
          f"({seconds:.0f} s), {args.parallel} trials at once in (a) and (b)")  # fmt: skip
    print(f"{'row':<26} {'TEST':>6} {'hold-out':>9} {'trials':>7} {'rungs':>6} {'cost':>5} "
          f"{'wall s':>7}")  # fmt: skip
    for name, row in rows.items():
        print(f"{name:<26} {row['test']:>6.3f} {row['holdout']:>9.3f} {row['trials']:>7} "
              f"{row['rungs']:>6} {row['cost']:>5} {row['seconds']:>7.0f}")  # fmt: skip
    a, b, c = rows.values()
    within = all(row["cost"] <= args.budget for row in rows.values())
    print(f"sum of costs <= budget in every row: {'met' if within else 'NOT met'}")
    for other, name in ((b, "(b)"), (c, "(c)")):
        for key, what in (("test", "TEST"), ("holdout", "hold-out")):
            verdict = "met" if a[key] >= other[key] or math.isnan(other[key]) else "NOT met"
            print(f"(a) >= {name} by {what} accuracy: {verdict}")


if __name__ == "__main__":
    main()
