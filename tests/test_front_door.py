"""`python -m trainer --help`: training first, the config groups found in conf/, Hydra's
`--cfg job` and each verb's own --help, answered without torch or Lightning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer import CONF_DIR
from trainer.front_door import epilog, groups

# Imports the entry point as `python -m trainer` does, asks for the help, and says which heavy
# libraries were loaded by then (none should be).
PROBE = """
import sys
from trainer.__main__ import main
sys.argv = ["trainer", *sys.argv[1:]]
try:
    main()
except SystemExit as end:
    heavy = sorted({"torch", "lightning", "pytorch_lightning", "mlflow"} & set(sys.modules))
    print("loaded:", ",".join(heavy) or "none")
    raise
"""


@pytest.fixture(scope="module", params=["--help", "-h"])
def shown(request) -> str:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, request.param],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_the_help_says_how_to_train_first(shown: str) -> None:
    assert shown.startswith("usage: python -m trainer [key=value ...]\n")
    training = shown.index("python -m trainer dataset.path=")
    assert training < shown.index("positional arguments:")  # before the management verbs
    for key in (
        "task=",
        "model_type=",
        "dataset.path=",
        "budget.train_budget_milli_node_hours=",
        "display_name=",
    ):
        assert f"\n  {key}" in shown
    for task in (p.stem for p in (CONF_DIR / "task").glob("*.yaml")):
        assert task in shown


def test_the_help_names_every_config_group_in_conf(shown: str) -> None:
    top = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    named = {group for group, _ in groups()}
    # Every folder of conf/ is a group or holds groups (hydra/sweeper, task_model/<task>).
    assert {group.split("/")[0] for group in named} == top
    for group, options in groups():
        line = next(line for line in shown.splitlines() if line.startswith(f"  {group} "))
        assert options[0] in line
    assert "model_type" in named and "task" in named and "task_model/image_classification" in named


def test_the_help_points_to_hydra_and_to_each_verb(shown: str) -> None:
    assert "--cfg job" in shown
    for verb in ("models", "operations", "predict", "weights", "sweeps", "datasets", "serve"):
        assert f"python -m trainer {verb} --help" in shown
    assert shown.rstrip().endswith("loaded: none")


def test_the_groups_are_read_from_the_folder(tmp_path: Path) -> None:
    """A group added to conf/ appears in the help without a second list to update."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "image_classification.yaml").write_text("name: image_classification\n")
    (tmp_path / "augment").mkdir()
    for name in ("light", "heavy"):
        (tmp_path / "augment" / f"{name}.yaml").write_text("{}\n")
    (tmp_path / "config.yaml").write_text(
        "defaults:\n  - task: image_classification\n  - augment: light\n  - _self_\n"
    )
    assert groups(tmp_path) == [("augment", ["heavy", "light"]), ("task", ["image_classification"])]
    assert "\n  augment  heavy, light (default)\n" in epilog(tmp_path)


def test_cfg_job_prints_the_config_without_training(tmp_path: Path) -> None:
    """What the help promises: `--cfg job` shows the composed config and starts nothing."""
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "model_type=mobile-versatile-1", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**_environment(), "VISION_TRAINER_HOME": str(tmp_path / "home")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_budget_milli_node_hours" in result.stdout
    assert "mobile-versatile-1" in result.stdout
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "home").exists()


def _environment() -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    return {**keep, "PYTHONPATH": str(REPO)}
