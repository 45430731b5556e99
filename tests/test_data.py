"""Reading datasets: folders, AutoML CSVs, the deterministic split, unreadable images."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.manifest import TEST, TRAIN, VALIDATE, describe, read_dataset, split_for
from trainer.errors import UserError
from trainer.tasks.image_classification.demo import LABELS, ensure_demo_dataset


def image(path: Path, colour=(0, 128, 255)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_split_is_deterministic_and_near_80_10_10() -> None:
    keys = [f"label/{i}.png" for i in range(5000)]
    splits = Counter(split_for(key) for key in keys)
    assert [split_for(key) for key in keys[:50]] == [split_for(key) for key in keys[:50]]
    assert 0.77 < splits[TRAIN] / 5000 < 0.83
    assert 0.08 < splits[VALIDATE] / 5000 < 0.12
    assert 0.08 < splits[TEST] / 5000 < 0.12


def test_csv_with_and_without_ml_use_and_quoted_paths(tmp_path: Path) -> None:
    image(tmp_path / "img" / "a 1.png")
    image(tmp_path / "img" / "b,2.png")
    image(tmp_path / "img" / "c.png")
    image(tmp_path / "img" / "d.png")
    csv = tmp_path / "data.csv"
    csv.write_text(
        'TRAIN,"img/a 1.png",cat\n'
        'VALIDATION,"img/b,2.png",cat\n'
        "TEST,img/c.png,dog\n"
        "TRAIN,img/d.png,dog\n"
        "\n"
    )
    csv2 = tmp_path / "unassigned.csv"
    csv2.write_text(f"{tmp_path / 'img' / 'c.png'},dog\nUNASSIGNED,img/d.png,cat\n")

    with pytest.raises(UserError, match="no TRAIN item|no VALIDATE|no TEST"):
        read_dataset(csv2)
    manifest = read_dataset(csv)
    by_key = {item.key: item for item in manifest.items}
    assert by_key["img/a 1.png"].split == TRAIN
    assert by_key["img/b,2.png"].split == VALIDATE
    assert by_key["img/b,2.png"].path == tmp_path / "img" / "b,2.png"
    assert by_key["img/c.png"].split == TEST
    assert manifest.labels == ["cat", "dog"]


def test_unassigned_rows_use_the_hash_split(tmp_path: Path) -> None:
    rows = []
    for index in range(40):
        image(tmp_path / f"{index}.png")
        rows.append(f"UNASSIGNED,{index}.png,{'ab'[index % 2]}")
    rows += ["TEST,0.png,a"]  # a repeated path keeps its first row
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    try:
        manifest = read_dataset(tmp_path / "d.csv")
    except UserError:
        pytest.fail("40 items should fill all three splits")
    for item in manifest.items:
        assert item.split == split_for(item.key)


def test_broken_empty_and_missing_images_are_skipped_and_counted(tmp_path: Path) -> None:
    folder = ensure_demo_dataset(tmp_path / "home", per_label=10, size=16)
    (folder / "circle" / "empty.png").write_bytes(b"")
    (folder / "square" / "broken.png").write_bytes(b"\x89PNG not really")
    good = (folder / "triangle" / "triangle_0000.png").read_bytes()
    (folder / "triangle" / "truncated.png").write_bytes(good[: len(good) // 2])
    manifest = read_dataset(folder)
    assert manifest.skipped == Counter({"empty": 1, "broken": 2})
    assert len(manifest.items) == 10 * len(LABELS)
    assert "skipped 3" in describe(manifest)

    csv = tmp_path / "with_missing.csv"
    # Each row keeps its split: hashed anew from the CSV's absolute paths (a temporary folder's),
    # 30 rows would have no VALIDATE one in about 4% of runs.
    lines = [f"{item.split},{item.path},{item.label}" for item in manifest.items]
    csv.write_text("\n".join([*lines, f"TRAIN,{tmp_path}/gone.png,circle"]) + "\n")
    assert read_dataset(csv).skipped == Counter({"missing": 1})


def test_label_with_no_training_item(tmp_path: Path) -> None:
    for index in range(20):
        image(tmp_path / f"a{index}.png")
    rows = [f"TRAIN,a{i}.png,a" for i in range(10)] + [
        f"VALIDATE,a{i}.png,b" for i in range(10, 15)
    ]
    rows += [f"TEST,a{i}.png,a" for i in range(15, 20)]
    (tmp_path / "d.csv").write_text("\n".join(rows))
    with pytest.raises(UserError, match="label\\(s\\) b have no TRAIN item"):
        read_dataset(tmp_path / "d.csv")


def test_demo_dataset_is_deterministic(tmp_path: Path) -> None:
    first = ensure_demo_dataset(tmp_path / "one", per_label=5, size=16)
    second = ensure_demo_dataset(tmp_path / "two", per_label=5, size=16)
    assert read_dataset(first).fingerprint() == read_dataset(second).fingerprint()
    for file in first.rglob("*.png"):
        assert file.read_bytes() == (second / file.relative_to(first)).read_bytes()


def multilabel_csv(folder: Path) -> Path:
    """Six images: two labels, one, three, none; each split with an image of every label."""
    rows = ["TRAIN,a.png,cat,dog", "TRAIN,b.png,bird", "TRAIN,c.png,dog,cat,bird,dog",
            "TRAIN,d.png", "VALIDATE,e.png,cat,bird", "TEST,f.png,dog"]  # fmt: skip
    for row in rows:
        image(folder / row.split(",")[1])
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


def test_a_csv_with_several_labels_a_row_reads_as_multilabel(tmp_path: Path) -> None:
    manifest = read_dataset(multilabel_csv(tmp_path))  # classification_type auto
    assert manifest.classification_type == "MULTILABEL" and manifest.multilabel
    assert manifest.labels == ["bird", "cat", "dog"]
    labels = {item.key: item.labels for item in manifest.items}
    assert labels == {"a.png": ("cat", "dog"), "b.png": ("bird",), "c.png": ("bird", "cat", "dog"),
                      "d.png": (), "e.png": ("bird", "cat"), "f.png": ("dog",)}  # fmt: skip
    with pytest.raises(ValueError, match="a.png has 2 labels"):
        _ = manifest.items[0].label  # a MULTICLASS item's one label, which this has not
    # The type is part of what was trained on.
    single = read_dataset(multilabel_csv(tmp_path), classification_type="MULTILABEL")
    assert single.fingerprint() == manifest.fingerprint()


def test_a_multiclass_dataset_refuses_a_row_with_several_labels_naming_it(tmp_path: Path) -> None:
    csv = multilabel_csv(tmp_path)
    with pytest.raises(UserError) as refusal:
        read_dataset(csv, classification_type="MULTICLASS")
    (line,) = str(refusal.value).splitlines()
    assert line == (
        f"{csv}:1: 2 labels (cat, dog) in a MULTICLASS dataset, which takes one an image; "
        "dataset.classification_type=MULTILABEL (or auto) reads them"
    )


def test_a_multiclass_csv_skips_a_path_without_a_label_and_keeps_its_dataset_id(
    tmp_path: Path,
) -> None:
    from trainer.data.manifest import dataset_id

    rows = ["TRAIN,a.png,cat", "TRAIN,b.png,dog", "VALIDATE,c.png,cat", "TEST,d.png,dog",
            "TRAIN,e.png"]  # fmt: skip
    for row in rows:
        image(tmp_path / row.split(",")[1])
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    manifest = read_dataset(tmp_path / "data.csv")
    assert manifest.classification_type == "MULTICLASS"
    assert [item.key for item in manifest.items] == ["a.png", "b.png", "c.png", "d.png"]
    assert manifest.skipped == {"no label": 1} and manifest.skipped_examples["no label"] == "e.png"
    # The datasetId of a MULTICLASS dataset is what it was before MULTILABEL ones were read.
    lines = [f"{row.split(',')[1]}\t{row.split(',')[2]}\t{row.split(',')[0]}" for row in rows[:4]]
    assert manifest.fingerprint() == dataset_id(lines)


def test_a_folder_dataset_may_train_as_multilabel(tmp_path: Path) -> None:
    for label in ("cat", "dog"):
        for split_hint in range(12):
            image(tmp_path / label / f"{split_hint}.png")
    assert read_dataset(tmp_path, for_training=False).classification_type == "MULTICLASS"
    manifest = read_dataset(tmp_path, for_training=False, classification_type="MULTILABEL")
    assert manifest.multilabel and {item.labels for item in manifest.items} == {("cat",), ("dog",)}


def test_classification_type_is_checked_with_the_config() -> None:
    from tests.typed import settings

    assert settings().dataset.classification_type == "auto"  # conf/dataset/default.yaml
    assert settings(dataset={"classification_type": "multilabel"}).dataset.classification_type == (
        "MULTILABEL"
    )
    with pytest.raises(UserError) as refusal:
        settings(dataset={"classification_type": "BINARY"})
    assert (
        "dataset.classification_type='BINARY' is invalid: use auto, MULTICLASS or MULTILABEL"
        in (str(refusal.value))
    )
