"""A dataset of real images that the project's own generator did not make: scikit-learn's
handwritten digits (1,797 scanned 8x8 images that ship inside the package, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_json, run_dirs, run_trainer
from trainer.tasks.image_classification.demo import write_digits


# 40 s, the suite's longest single training: `make test-all` runs it. The fast suite's trainings
# learn generated shapes (test_training_e2e.py: MODEL_CONVERGED) and videos (test_tasks_e2e.py).
@pytest.mark.slow
def test_real_digits_train_far_above_chance(tmp_path: Path, trainer_home: Path) -> None:
    write_digits(tmp_path / "digits")
    result = run_trainer(
        f"dataset.path={tmp_path / 'digits'}",
        "model.input_size=[32,32]",
        "data.crop_scale=[0.85,1.0]",
        "data.horizontal_flip=false",  # a mirrored digit is another glyph
        "early_stopping.patience=3",
        "early_stopping.min_patience_steps=0",
        "early_stopping.patience_before_first_gain=3",
        "budget.min_milli_node_hours=1",
        "budget.train_budget_milli_node_hours=10",
        "display_name=digits",
        cwd=tmp_path,
        home=trainer_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_json(run_dir / "metrics.json")
    model = read_json(run_dir / "model.json")
    assert int(model["imageClassificationModelMetadata"]["trainCostMilliNodeHours"]) <= 10
    assert metrics["test_accuracy"] >= 0.6, metrics  # chance is 0.1
