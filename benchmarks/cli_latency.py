"""Wall-clock of `python -m trainer models list` (and `operations list`) on a store of 50 models.

The store is built in a temporary folder: one real short training, then 49 more registered
models and runs shaped like it (training 50 would measure nothing more). Each command runs 7
times; the median is printed. Target: well under 2 s on a 2-core CPU.

    .venv/bin/python benchmarks/cli_latency.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = 50


def trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=str(REPO), VISION_TRAINER_HOME=str(cwd / "home"))
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip


def build_store(cwd: Path) -> None:
    from trainer.tasks.image_classification.demo import write_shapes

    write_shapes(cwd / "data", per_label=24, size=32, seed=7)
    trained = trainer(
        f"dataset.path={cwd / 'data'}", "model.input_size=[32,32]", "early_stopping.patience=2",
        "budget.min_milli_node_hours=1", "budget.train_budget_milli_node_hours=5", cwd=cwd,
    )  # fmt: skip
    model = json.loads(trained.stdout)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    original = client.get_registered_model(model["name"].rsplit("/", 1)[1])
    experiment = client.get_experiment_by_name("vision-trainer").experiment_id
    (run,) = client.search_runs([experiment])
    for index in range(1, MODELS):
        model_id = f"ICN{9000000000000000000 + index}"
        copy = {**model, "name": f"models/{model_id}", "displayName": f"copy_{index}"}
        client.create_registered_model(
            model_id,
            tags={**original.tags, "model_id": model_id, "model_json": json.dumps(copy)},
            description=json.dumps(copy),
        )
        operation = json.loads(run.data.tags["operation_json"])
        operation["name"] = f"operations/{model_id}"
        client.create_run(
            experiment,
            tags={**run.data.tags, "operation": operation["name"], "model_id": model_id,
                  "operation_json": json.dumps(operation)},
        )  # fmt: skip


def median_seconds(*args: str, cwd: Path, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer(*args, cwd=cwd)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        build_store(cwd)
        listed = json.loads(trainer("models", "list", "--json", cwd=cwd).stdout)["model"]
        assert len(listed) == MODELS, len(listed)
        for verb in (["models", "list"], ["operations", "list"], ["models", "list", "--json"]):
            seconds = median_seconds(*verb, cwd=cwd)
            command = "python -m trainer " + " ".join(verb)
            print(f"{command:<40} {seconds:.3f} s (median of 7, {MODELS} models)")


if __name__ == "__main__":
    main()
