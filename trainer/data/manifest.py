"""Reading a labelled image dataset into a manifest: which image, which label, which split.

Two forms, as AutoML reads them: a folder with one sub-folder per label, or a CSV with rows
``[ML_USE,]path,label``. UNASSIGNED items split 80/10/10 by a hash of their path, so the same
item always lands in the same split. Missing, empty and broken images are skipped and counted.
Nothing here imports torch: the management CLI and config checks stay fast.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from trainer.errors import UserError

TRAIN, VALIDATE, TEST = "TRAIN", "VALIDATE", "TEST"
SPLITS = (TRAIN, VALIDATE, TEST)
ML_USE = {"TRAIN": TRAIN, "VALIDATE": VALIDATE, "VALIDATION": VALIDATE, "TEST": TEST}
UNASSIGNED = "UNASSIGNED"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,32}$")


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    split: str
    key: str  # the path as the dataset spells it: what the split hash and fingerprint use


class Splits:
    """``split`` and ``counts`` of any manifest whose ``items`` each carry a ``split``: image,
    detection and video manifests alike."""

    items: Any

    def split(self, name: str) -> list[Any]:
        return [item for item in self.items if item.split == name]

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


@dataclass
class Manifest(Splits):
    items: list[Item]
    labels: list[str]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """The datasetId: a digest of what was trained on (paths, labels, splits)."""
        digest = hashlib.sha256()
        for item in sorted(self.items, key=lambda i: i.key):
            digest.update(f"{item.key}\t{item.label}\t{item.split}\n".encode())
        return digest.hexdigest()[:24]


def check_name(kind: str, value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise UserError(
            f"{kind} {value!r} is invalid: use 1 to 32 ASCII letters, digits or underscores"
        )
    return value


def split_for(key: str) -> str:
    """80/10/10 by a stable hash of the item's path, for UNASSIGNED items."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    if bucket < 80:
        return TRAIN
    return VALIDATE if bucket < 90 else TEST


def read_dataset(path: str | Path, check_workers: int = 8, for_training: bool = True) -> Manifest:
    """The readable items of a dataset; for training, also checked to be trainable (labels,
    splits); for evaluation, any labelled images will do."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"dataset.path={str(path)!r} does not exist; give a folder or a CSV file")
    candidates = _read_csv(root) if root.is_file() else _read_folder(root)
    manifest = _keep_readable(candidates, check_workers)
    if for_training:
        _check_usable(manifest, path)
    return manifest


def _read_folder(root: Path) -> list[Item]:
    items = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = check_name("label", label_dir.name)
        for file in sorted(label_dir.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                key = file.relative_to(root).as_posix()
                items.append(Item(file, label, split_for(key), key))
    return items


def _read_csv(csv_path: Path) -> list[Item]:
    items: list[Item] = []
    seen: set[str] = set()
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            row = [cell.strip() for cell in row]
            if not any(row):
                continue
            ml_use = row[0].upper()
            if ml_use in ML_USE or ml_use == UNASSIGNED:
                row = row[1:]
            else:
                ml_use = UNASSIGNED
            if len(row) < 2 or not row[0] or not row[1]:
                raise UserError(
                    f"{csv_path}:{line_no}: expected [ML_USE,]path,label but got {','.join(row)!r}"
                )
            key, label = row[0], check_name("label", row[1])
            if key in seen:
                continue
            seen.add(key)
            file = Path(key).expanduser()
            if not file.is_absolute():
                file = csv_path.parent / file
            split = ML_USE.get(ml_use) or split_for(key)
            items.append(Item(file, label, split, key))
    return items


def problem_with(item: Item) -> str | None:
    try:
        if item.path.stat().st_size == 0:
            return "empty"
        with Image.open(item.path) as image:
            image.load()  # decode fully: a truncated file passes Image.verify()
    except FileNotFoundError:
        return "missing"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "broken"
    return None


def _keep_readable(items: list[Item], workers: int) -> Manifest:
    # PIL releases the GIL while decoding, so threads check images in parallel.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(problem_with, items))
    manifest = Manifest(items=[], labels=[])
    for item, problem in zip(items, problems, strict=True):
        if problem is None:
            manifest.items.append(item)
        else:
            manifest.skipped[problem] += 1
            manifest.skipped_examples.setdefault(problem, str(item.path))
    manifest.labels = sorted({item.label for item in manifest.items})
    return manifest


def _check_usable(manifest: Manifest, path: str | Path) -> None:
    if len(manifest.labels) < 2:
        found = ", ".join(manifest.labels) or "none"
        raise UserError(
            f"dataset.path={str(path)!r} has {len(manifest.labels)} usable label(s) ({found}); "
            "a classifier needs at least two labels with readable images"
        )
    train_labels = {item.label for item in manifest.split(TRAIN)}
    missing = [label for label in manifest.labels if label not in train_labels]
    if missing:
        raise UserError(
            f"label(s) {', '.join(missing)} have no TRAIN item in dataset.path={str(path)!r}; "
            "add images for them or mark some rows TRAIN"
        )
    for split in (VALIDATE, TEST):
        if not manifest.split(split):
            raise UserError(
                f"dataset.path={str(path)!r} has no {split} items; add more images or mark "
                f"some rows {split} in the CSV"
            )


def describe(manifest: Manifest) -> str:
    counts = manifest.counts()
    text = (
        f"{len(manifest.items)} images, {len(manifest.labels)} labels "
        f"(train {counts[TRAIN]}, validate {counts[VALIDATE]}, test {counts[TEST]})"
    )
    if manifest.skipped:
        parts = ", ".join(
            f"{n} {why} (e.g. {manifest.skipped_examples[why]})"
            for why, n in sorted(manifest.skipped.items())
        )
        text += f"; skipped {sum(manifest.skipped.values())}: {parts}"
    return text
