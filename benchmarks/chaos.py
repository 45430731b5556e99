"""Chaos: trainings killed with SIGKILL at random moments, resumed until done.

Each of N trainings (default 20) is started, killed with SIGKILL at a random moment after its
operation opened (any phase: checking the dataset's files, building the image cache, steps,
validation, checkpoint writes, the TEST pass, recording), then resumed with
`resume_operation=`, and each resume is killed again with probability 1/2, until the operation
is done. Prints, over all operations:

- resumes that succeeded (a resume that ended on its own ended with its operation done),
- checkpoints that failed to load (the resumes' "does not load" warnings),
- operations whose final cost exceeds the budget,
- the largest cost lost to a kill: elapsed billing time of the killed piece not on record.

Targets: N/N, 0, 0, at most `checkpoint.cost_flush_seconds`.

    .venv/bin/python benchmarks/chaos.py [--trainings 20] [--seed 0] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.tasks.image_classification.demo import write_shapes  # noqa: E402

PHASES: Counter = Counter()  # where the kills landed
BUDGET = 40  # milli-node-hours a training: 144 s, room for a fresh home's 20 s reserves
# The first kill of a training is drawn from 0 to this many seconds after its operation opens:
# these trainings take 18 s or more, so most first kills land before the end. One that ends
# first is not counted: another training takes its place, so that N trainings are killed.
LIFETIME_SECONDS = 16.0
FLUSH = 2.0  # checkpoint.cost_flush_seconds (30 by default)
ARGS = [
    "model.input_size=[32,32]",
    "data.batch_size=16",
    "data.cache=on",
    "budget.min_milli_node_hours=1",
    f"budget.train_budget_milli_node_hours={BUDGET}",
    # The save reserves are the product's own (auto: learned from this home's recordings); a
    # fixed small one would be this script's promise, not the trainer's.
    "mlflow.model_format=torchscript",
    "early_stopping.patience=3",
    f"checkpoint.cost_flush_seconds={FLUSH}",
    "checkpoint.every_minutes=0.05",
]


def launch(args: list[str], cwd: Path, home: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(VISION_TRAINER_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def read_state(run_dir: Path) -> dict:
    for _ in range(50):  # a reader may meet the rename; it is atomic, so try again
        try:
            return json.loads((run_dir / "state.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RuntimeError(f"{run_dir}/state.json unreadable")


def run_piece(
    args: list[str], cwd: Path, home: Path, rng: random.Random, kill: bool, run_dir: Path | None
) -> tuple[Path | None, str, float | None]:
    """One process: (its run directory, its stderr, the cost lost if it was killed)."""
    spent_before = read_state(run_dir)["spent_seconds"] if run_dir else 0.0
    process = launch(args, cwd, home)
    if not kill:
        _, stderr = process.communicate(timeout=900)
        return run_dir, stderr, None
    # Wait for the operation to open (a fresh training's state.json, or the resume's own pid).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        found = run_dir or next(iter(sorted(cwd.glob("runs/*/*/state.json"))), None)
        found = found if found is None or found.name != "state.json" else found.parent
        if found is not None and read_state(found).get("pid") == process.pid:
            run_dir = found
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, LIFETIME_SECONDS))
    lost = None
    if process.poll() is None:
        killed_at = time.time()
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = read_state(run_dir)
        stale = killed_at - (run_dir / "state.json").stat().st_mtime
        if state["status"] != "RUNNING":
            # The operation had ended (its model and cost recorded) and the process was on its
            # way out: nothing of it is billed any more, so nothing is lost.
            PHASES["after the operation ended"] += 1
            lost = 0.0
            print(f"  killed after the operation ended ({state['status']})", flush=True)
        else:
            lost = (killed_at - state["piece_started"]) - (state["spent_seconds"] - spent_before)
            PHASES[state.get("phase") or "opening"] += 1
            print(f"  killed in {state.get('phase')!r}: {lost:.2f} s of cost not on record, "
                  f"state.json written {stale:.2f} s before", flush=True)  # fmt: skip
    _, stderr = process.communicate()
    return run_dir, stderr, lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainings", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(args.folder or tempfile.mkdtemp(prefix="chaos-"))
    data = root / "shapes"
    if not data.is_dir():
        write_shapes(data, per_label=40, size=64, seed=1)
    done = resumes_ended = resumes_ok = load_failures = over_budget = kills = 0
    largest_lost = -float("inf")
    index = started = 0
    while index < args.trainings:
        cwd, home = root / f"t{started:02d}", root / f"home{started:02d}"  # a cache to build
        started += 1
        cwd.mkdir(parents=True, exist_ok=True)
        run_dir, _, lost = run_piece([*ARGS, f"dataset.path={data}"], cwd, home, rng, True, None)
        if lost is None:
            print("  ended before its kill moment: not counted, another training starts")
            continue
        kills, largest_lost = kills + 1, max(largest_lost, lost)
        while run_dir is not None and not (run_dir / "model.json").is_file():
            state = read_state(run_dir)
            operation = state["operation"].rsplit("/", 1)[1]
            kill = rng.random() < 0.5
            _, stderr, lost = run_piece(
                [f"resume_operation={operation}"], cwd, home, rng, kill, run_dir
            )
            load_failures += stderr.count("does not load")
            if lost is None:  # it ended on its own
                resumes_ended += 1
                resumes_ok += (run_dir / "model.json").is_file()
                if not (run_dir / "model.json").is_file():
                    print(f"training {index}: a resume ended without the model:\n{stderr[-2000:]}")
                    break
            else:
                kills, largest_lost = kills + 1, max(largest_lost, lost)
        if run_dir is not None and (run_dir / "model.json").is_file():
            model = json.loads((run_dir / "model.json").read_text())
            done += 1
            cost = int(model["imageClassificationModelMetadata"]["trainCostMilliNodeHours"])
            over_budget += cost > BUDGET
            print(f"training {index}: done, cost {cost}/{BUDGET}, lost at most "
                  f"{largest_lost:.2f} s so far", flush=True)  # fmt: skip
        index += 1
    print(f"operations done:                         {done}/{args.trainings} "
          f"({started - args.trainings} more started ended before their first kill)")  # fmt: skip
    print(f"resumes that succeeded:                  {resumes_ok}/{resumes_ended} "
          "(of those not killed)")  # fmt: skip
    print(f"checkpoints that failed to load:         {load_failures}")
    print(f"operations whose cost exceeds the budget: {over_budget}")
    print(f"largest cost lost to a kill:             {largest_lost:.2f} s over {kills} kills "
          f"(checkpoint.cost_flush_seconds={FLUSH})")  # fmt: skip
    print(f"phases the kills landed in:              {dict(PHASES)}")


if __name__ == "__main__":
    main()
