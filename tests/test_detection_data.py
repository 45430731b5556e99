"""Object-detection datasets: AutoML's CSV (both box forms, bad boxes, negatives), the
generated demo dataset and the dataset built from real photos."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.real_detection_dataset import build_real_detection_dataset
from trainer.data.manifest import TEST, TRAIN, VALIDATE, split_for
from trainer.errors import UserError
from trainer.tasks.object_detection.data import (
    INVERTED,
    NO_GOOD_BOX,
    OUTSIDE,
    TOO_SMALL,
    Box,
    describe,
    read_detection_dataset,
)
from trainer.tasks.object_detection.demo import LABELS, ensure_demo_detection_dataset

REPO = Path(__file__).resolve().parent.parent


def _image(path: Path, size: tuple[int, int] = (20, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


def _dataset(tmp_path: Path, rows: list[str], images: list[str] | None = None) -> Path:
    """A CSV with the given rows, and images for every name in ``images`` (default a..f)."""
    for name in images if images is not None else [f"{c}.png" for c in "abcdef"]:
        _image(tmp_path / name)
    csv_path = tmp_path / "boxes.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


# Two labels with TRAIN, VALIDATE and TEST boxes: what every usable dataset below starts from.
BASE = [
    "TRAIN,a.png,cat,0.1,0.1,,,0.5,0.6,,",
    "TRAIN,a.png,dog,0.5,0.5,,,0.9,0.9,,",
    "VALIDATE,b.png,cat,0.2,0.2,,,0.4,0.4,,",
    "TEST,c.png,dog,0.2,0.2,,,0.4,0.4,,",
]


def _by_key(manifest) -> dict:
    return {item.key: item for item in manifest.items}


def test_two_vertex_rows_give_one_image_with_several_boxes(tmp_path: Path) -> None:
    manifest = read_detection_dataset(_dataset(tmp_path, BASE))
    items = _by_key(manifest)
    assert manifest.labels == ["cat", "dog"]
    assert items["a.png"].split == TRAIN
    assert items["a.png"].boxes == (
        Box("cat", 0.1, 0.1, 0.5, 0.6),
        Box("dog", 0.5, 0.5, 0.9, 0.9),
    )
    assert items["a.png"].path == tmp_path / "a.png"
    assert manifest.counts() == {TRAIN: 1, VALIDATE: 1, TEST: 1}
    assert manifest.box_counts() == {TRAIN: 2, VALIDATE: 1, TEST: 1}
    assert not manifest.skipped


def test_four_vertex_rows_in_any_order_give_their_extent(tmp_path: Path) -> None:
    rows = BASE + [
        # top-left, top-right, bottom-right, bottom-left (AutoML's order)
        "TRAIN,d.png,cat,0.1,0.2,0.7,0.2,0.7,0.8,0.1,0.8",
        # the same corners listed from the bottom right
        "TRAIN,e.png,dog,0.7,0.8,0.1,0.8,0.1,0.2,0.7,0.2",
    ]
    items = _by_key(read_detection_dataset(_dataset(tmp_path, rows)))
    assert items["d.png"].boxes == (Box("cat", 0.1, 0.2, 0.7, 0.8),)
    assert items["e.png"].boxes == (Box("dog", 0.1, 0.2, 0.7, 0.8),)


def test_ml_use_is_optional_with_aliases_and_unassigned(tmp_path: Path) -> None:
    rows = BASE + [
        "d.png,cat,0.1,0.1,,,0.5,0.5,,",  # no ML_USE column
        "UNASSIGNED,e.png,dog,0.1,0.1,,,0.5,0.5,,",
        "validation,f.png,cat,0.1,0.1,,,0.5,0.5,,",  # alias, lower case
    ]
    items = _by_key(read_detection_dataset(_dataset(tmp_path, rows)))
    assert items["d.png"].split == split_for("d.png")
    assert items["e.png"].split == split_for("e.png")
    assert items["f.png"].split == VALIDATE


def test_quoted_paths_and_trailing_cells(tmp_path: Path) -> None:
    rows = BASE + [
        'TRAIN,"my, photo.png",cat,0.1,0.1,,,0.5,0.5',  # trailing empty cells left out
        'TRAIN," spaced.png ",dog,0.1,0.1,,,0.5,0.5,,,,',  # extra empty cells
    ]
    csv_path = _dataset(tmp_path, rows, [f"{c}.png" for c in "abc"] + ["my, photo.png"])
    _image(tmp_path / "spaced.png")
    items = _by_key(read_detection_dataset(csv_path))
    assert items["my, photo.png"].boxes == (Box("cat", 0.1, 0.1, 0.5, 0.5),)
    assert items["spaced.png"].boxes == (Box("dog", 0.1, 0.1, 0.5, 0.5),)


def test_rows_without_label_or_box_are_negative_examples(tmp_path: Path) -> None:
    rows = BASE + ["TRAIN,d.png", "e.png", "TEST,f.png,,,,,,,,,", "TRAIN,a.png"]
    manifest = read_detection_dataset(_dataset(tmp_path, rows))
    items = _by_key(manifest)
    assert items["d.png"].boxes == items["e.png"].boxes == items["f.png"].boxes == ()
    assert items["f.png"].split == TEST
    assert len(items["a.png"].boxes) == 2  # a negative row adds nothing to an image with boxes
    assert "3 without boxes" in describe(manifest)


def test_bad_boxes_are_counted_with_an_example_and_skipped(tmp_path: Path) -> None:
    rows = BASE + [
        "TRAIN,d.png,cat,0.1,0.1,,,1.2,0.5,,",  # outside [0, 1]
        "TRAIN,d.png,cat,-0.1,0.1,,,0.5,0.5,,",  # outside [0, 1]
        "TRAIN,d.png,dog,0.6,0.1,,,0.2,0.5,,",  # inverted (x_max < x_min)
        "TRAIN,d.png,dog,0.2,0.3,,,0.6,0.305,,",  # 0.005 high: under 0.01
        "TRAIN,d.png,cat,0.2,0.2,,,0.3,0.3,,",  # good: the image stays
        "TRAIN,e.png,cat,0.5,0.5,,,0.5,0.9,,",  # zero wide: inverted; e.png's only box
    ]
    manifest = read_detection_dataset(_dataset(tmp_path, rows))
    items = _by_key(manifest)
    assert items["d.png"].boxes == (Box("cat", 0.2, 0.2, 0.3, 0.3),)
    assert "e.png" not in items  # kept as a negative, its object would count as background
    assert manifest.skipped == {OUTSIDE: 2, INVERTED: 2, TOO_SMALL: 1, NO_GOOD_BOX: 1}
    assert manifest.skipped_examples[OUTSIDE] == "boxes.csv:5 d.png"
    assert manifest.skipped_examples[TOO_SMALL] == "boxes.csv:8 d.png"
    text = describe(manifest)
    assert "skipped 6" in text and "box edge < 0.01" in text


def test_missing_and_broken_images_are_skipped_and_counted(tmp_path: Path) -> None:
    rows = BASE + ["TRAIN,gone.png,cat,0.1,0.1,,,0.5,0.5,,", "TRAIN,bad.png"]
    csv_path = _dataset(tmp_path, rows)
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    manifest = read_detection_dataset(csv_path)
    assert set(_by_key(manifest)) == {"a.png", "b.png", "c.png"}
    assert manifest.skipped == {"missing": 1, "broken": 1}
    assert manifest.skipped_examples["missing"] == str(tmp_path / "gone.png")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("TRAIN,d.png,cat,,,,,,,,", "with a label and a box"),  # a label without a box
        ("TRAIN,d.png,,0.1,0.1,,,0.5,0.5,,", "with a label and a box"),  # a box without label
        ("TRAIN,d.png,cat,0.1,0.1,0.5,,,,,", "with a label and a box"),  # three coordinates
        ("TRAIN,d.png,cat,0.1,0.1,,,0.5,0.5,,,0.3", "with a label and a box"),  # extra cell
        ("TRAIN,d.png,cat,left,0.1,,,0.5,0.5,,", "must be numbers"),
        ("TRAIN,d.png,big cat,0.1,0.1,,,0.5,0.5,,", "label 'big cat' is invalid"),
        ("TRAIN,,cat,0.1,0.1,,,0.5,0.5,,", "the path is missing"),
    ],
)
def test_malformed_rows_are_the_users_error_with_the_line(
    tmp_path: Path, row: str, message: str
) -> None:
    with pytest.raises(UserError, match=message) as error:
        read_detection_dataset(_dataset(tmp_path, BASE + [row]))
    if "invalid" not in message:
        assert "boxes.csv:5" in str(error.value)


def test_unusable_datasets_are_clear_errors(tmp_path: Path) -> None:
    one_label = [row.replace("dog", "cat") for row in BASE]
    with pytest.raises(UserError, match="1 usable label"):
        read_detection_dataset(_dataset(tmp_path / "one", one_label))
    assert read_detection_dataset(tmp_path / "one" / "boxes.csv", min_labels=1).labels == ["cat"]
    with pytest.raises(UserError, match="no TEST box"):
        read_detection_dataset(_dataset(tmp_path / "no_test", BASE[:3]))
    # evaluating a model on another dataset: any readable boxes will do
    assert read_detection_dataset(tmp_path / "no_test", for_training=False).counts()[TEST] == 0
    with pytest.raises(UserError, match="label\\(s\\) dog have no TRAIN box"):
        read_detection_dataset(_dataset(tmp_path / "no_train", BASE[0:1] + BASE[2:]))
    with pytest.raises(UserError, match="does not exist"):
        read_detection_dataset(tmp_path / "nowhere.csv")


def test_a_folder_with_one_csv_is_read_and_two_are_refused(tmp_path: Path) -> None:
    _dataset(tmp_path, BASE)
    assert read_detection_dataset(tmp_path).labels == ["cat", "dog"]
    (tmp_path / "other.csv").write_text("")
    with pytest.raises(UserError, match="2 CSV files"):
        read_detection_dataset(tmp_path)


def test_fingerprint_covers_boxes_and_is_stable(tmp_path: Path) -> None:
    first = read_detection_dataset(_dataset(tmp_path / "x", BASE)).fingerprint()
    again = read_detection_dataset(tmp_path / "x" / "boxes.csv").fingerprint()
    moved = [BASE[0].replace("0.5,0.6", "0.5,0.7")] + BASE[1:]
    other = read_detection_dataset(_dataset(tmp_path / "y", moved)).fingerprint()
    assert first == again != other


def test_data_and_prediction_formatting_do_not_import_torch() -> None:
    code = (
        "import sys, trainer.tasks.object_detection.data, trainer.tasks.object_detection.predict, "
        "trainer.tasks.object_detection.demo;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_demo_dataset_is_deterministic_with_negatives_in_every_split(tmp_path: Path) -> None:
    csv_path = ensure_demo_detection_dataset(tmp_path / "one", images=40, size=48)
    assert ensure_demo_detection_dataset(tmp_path / "one", images=40, size=48) == csv_path
    manifest = read_detection_dataset(csv_path)
    twin = read_detection_dataset(ensure_demo_detection_dataset(tmp_path / "two", 40, 48))
    assert manifest.fingerprint() == twin.fingerprint()
    assert not manifest.skipped
    assert manifest.labels == sorted(LABELS)
    assert manifest.counts() == {TRAIN: 32, VALIDATE: 4, TEST: 4}
    assert any(not item.boxes for item in manifest.items)
    assert max(len(item.boxes) for item in manifest.items) > 1
    assert not list(csv_path.parent.parent.glob(".staging-*"))


def test_real_photo_dataset_parses_cleanly(tmp_path: Path) -> None:
    csv_path = build_real_detection_dataset(tmp_path, images=30, size=96, seed=1)
    manifest = read_detection_dataset(csv_path)
    assert manifest.labels == ["face", "flag", "flower", "pagoda"]
    assert not manifest.skipped
    assert manifest.counts() == {TRAIN: 24, VALIDATE: 3, TEST: 3}
    assert any(not item.boxes for item in manifest.items)
    with Image.open(manifest.items[0].path) as image:
        assert image.size == (96, 96)
