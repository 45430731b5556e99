"""A user's mistake: exit code 2 and one line on stderr that names the value, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_trainer


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["dataset.path=/no/such/folder"], ["dataset.path='/no/such/folder'", "does not exist"]),
        (["model_type=mobile-fast-9"], ["model_type 'mobile-fast-9'", "mobile-versatile-1"]),
        (
            ["task=video_classification", "model_type=mobile-low-latency-1", "--cfg", "job"],
            [
                "model_type 'mobile-low-latency-1' for task video_classification",
                "mobile-versatile-1",
            ],
        ),
        (
            ["task=object_detection", "model_type=cloud", "budget.train_budget_milli_node_hours=9"],
            ["9", "[20000, 900000]"],  # the alias brings cloud-high-accuracy-1's bounds
        ),
        (["task=segmentation"], ["unknown task 'segmentation'", "object_detection"]),
        (["data.cache=maybe"], ["data.cache='maybe'", "auto, on or off"]),
        (
            ["budget.train_budget_milli_node_hours=500"],
            ["500", "[1000, 100000]", "budget.min_milli_node_hours"],
        ),
        (
            ["model_type=cloud", "budget.train_budget_milli_node_hours=900000"],
            ["900000", "[8000, 800000]"],
        ),
        (["budget.train_budget_milli_node_hours=abc"], ["'abc'", "not an integer"]),
        (["budget.train_budget_milli_node_hours=5.5"], ["5.5", "not an integer"]),
        (["display_name=my-model"], ["display_name 'my-model'", "underscores"]),
        (["display_name=" + "x" * 33], ["display_name 'xxx", "1 to 32"]),
        (["display_name=my-model!"], ["cannot parse the override", "display_name=my-model!"]),
        (["model.input_size=[0,5]"], ["model.input_size=[0, 5]", "between 1 and 4096"]),
        (["model.pretrained=maybe"], ["model.pretrained='maybe'", "auto, true or false"]),
        (
            ["model.pretrained=true"],  # the suite's torch hub cache is empty
            [
                "not in the local torch hub cache",
                "python -m trainer weights download --task image_classification "
                "--model-type mobile-low-latency-1",
            ],
        ),
    ],
)
def test_config_mistakes(tmp_path: Path, trainer_home: Path, args, needles) -> None:
    result = run_trainer(*args, cwd=tmp_path, home=trainer_home)
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "mlflow.db").exists()  # refused before any work


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_dataset_with_one_label(tmp_path: Path, trainer_home: Path) -> None:
    for index in range(5):
        _image(tmp_path / "data" / "only_cats" / f"{index}.png")
    result = run_trainer(f"dataset.path={tmp_path / 'data'}", cwd=tmp_path, home=trainer_home)
    assert_one_line_error(result, "1 usable label", "at least two labels")
    # Refused before an operation opened: no run directory holds one, no store was created.
    assert not list(tmp_path.glob("runs/**/operation.json"))
    assert not (tmp_path / "mlflow.db").exists()


def test_dataset_with_invalid_label(tmp_path: Path, trainer_home: Path) -> None:
    _image(tmp_path / "data" / "good_label" / "a.png")
    _image(tmp_path / "data" / "bad label!" / "b.png")
    result = run_trainer(f"dataset.path={tmp_path / 'data'}", cwd=tmp_path, home=trainer_home)
    assert_one_line_error(result, "label 'bad label!'", "ASCII letters")


def test_a_budget_below_the_reserves_is_refused_before_anything_is_billed(
    tmp_path: Path, tiny_shapes: Path
) -> None:
    """3.6 s of budget against 4 s kept for recording and 4 s for checkpoints: no operation."""
    result = run_trainer(
        f"dataset.path={tiny_shapes}", "budget.min_milli_node_hours=1",
        "budget.train_budget_milli_node_hours=1", "budget.save_reserve_seconds=4",
        cwd=tmp_path, home=tmp_path / "home",
    )  # fmt: skip
    assert_one_line_error(result, "is too small", "use more than 3")
    assert not list(tmp_path.glob("runs/**/operation.json"))
    assert not (tmp_path / "mlflow.db").exists()
