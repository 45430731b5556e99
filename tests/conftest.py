from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.tasks.image_classification.demo import write_shapes

REPO = Path(__file__).resolve().parent.parent

# Small and quick: 32-pixel inputs, early stopping after two flat epochs, bounds opened up.
FAST = [
    "model.input_size=[32,32]",
    "data.batch_size=16",
    "early_stopping.patience=2",
    "early_stopping.patience_before_first_gain=2",  # tiny runs: no longer wait for a slow start
    "budget.min_milli_node_hours=1",
    "budget.train_budget_milli_node_hours=200",
    "budget.save_reserve_seconds=4",  # tiny networks record in about 2 s on an idle machine
]


@pytest.fixture(scope="session")
def trainer_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_shapes")
    write_shapes(folder, per_label=24, size=32, seed=7)
    return folder


def run_trainer(
    *args: str, cwd: Path, home: Path, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "HYDRA_"))
    }
    environment.update(VISION_TRAINER_HOME=str(home), PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "runs").rglob("operation.json"))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
