"""Manifests: which item, which label, which split; the rules every task's dataset follows, and
the labelled-image dataset that image classification reads and the image cache keys on.

Every manifest splits its items into TRAIN, VALIDATE and TEST by AutoML's ML_USE column, or, for
UNASSIGNED items, by a stable hash of the item's path (the same item always lands in the same
split); it skips what it cannot use (missing, empty and broken files, bad rows), counting each
reason with an example for the report; and a dataset that cannot train (fewer than two labels, a
label with nothing to train on, no VALIDATE or TEST data) is the user's error.

Labelled images come in two forms, as AutoML reads them: a folder with one sub-folder per label,
or a CSV with rows ``[ML_USE,]path,label``; UNASSIGNED items split 80/10/10. A classification
dataset is MULTICLASS (one label an image) or MULTILABEL (any number, none included: a CSV row
``[ML_USE,]path[,label1,label2,...]``), as AutoML's ``classificationType``. Nothing here imports
torch: the management CLI and config checks stay fast.
"""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from trainer.errors import UserError
from trainer.settings import AUTO, MULTICLASS, MULTILABEL
from trainer.store.resources import check_name

TRAIN, VALIDATE, TEST = "TRAIN", "VALIDATE", "TEST"
SPLITS = (TRAIN, VALIDATE, TEST)
ML_USE = {"TRAIN": TRAIN, "VALIDATE": VALIDATE, "VALIDATION": VALIDATE, "TEST": TEST}
UNASSIGNED = "UNASSIGNED"
NO_LABEL = "no label"  # a MULTICLASS row with a path alone: nothing to learn from it
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# -- what every manifest shares ----------------------------------------------------------------


class ManifestBase:
    """Splits, counts and the skip report of any manifest whose ``items`` each carry a
    ``split``: image, detection and video manifests alike. Subclasses are dataclasses with
    ``skipped`` (a Counter of reasons) and ``skipped_examples`` (one example per reason)."""

    items: Any
    labels: list[str]
    skipped: Counter
    skipped_examples: dict[str, str]

    def split(self, name: str) -> list[Any]:
        return [item for item in self.items if item.split == name]

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}

    def skip(self, reason: str, example: str, count: int = 1) -> None:
        self.skipped[reason] += count
        self.skipped_examples.setdefault(reason, example)

    def skipped_text(self) -> str:
        """``3 broken (e.g. a.png), 1 missing (e.g. b.png)``; empty when nothing was skipped."""
        return ", ".join(
            f"{n} {why} (e.g. {self.skipped_examples[why]})"
            for why, n in sorted(self.skipped.items())
        )

    def skipped_summary(self, unit: str = "") -> str:
        """What ``describe`` appends: ``; skipped 4 images: ...``, or nothing."""
        if not self.skipped:
            return ""
        return f"; skipped {sum(self.skipped.values())}{' ' + unit if unit else ''}: " + (
            self.skipped_text()
        )


def dataset_id(lines: Iterable[str]) -> str:
    """A datasetId: the digest of one line per item, in a stable order, as each task spells it."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()[:24]


def split_for(key: str) -> str:
    """80/10/10 by a stable hash of the item's path, for UNASSIGNED items."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 100
    if bucket < 80:
        return TRAIN
    return VALIDATE if bucket < 90 else TEST


def csv_rows(csv_path: Path) -> Iterator[tuple[int, list[str]]]:
    """The non-blank rows of a dataset CSV, cells stripped, with their line numbers (a BOM from
    spreadsheet exports is not part of the first cell). A file that is not UTF-8 text or not
    CSV (a field past csv's size limit, a NUL byte) is the user's error, in one line."""
    line_no = 0
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            for line_no, row in enumerate(csv.reader(handle), start=1):
                cells = [cell.strip() for cell in row]
                if any(cells):
                    yield line_no, cells
    except UnicodeDecodeError as error:
        raise UserError(
            f"{csv_path} is not UTF-8 text (byte {error.start} of its line {line_no + 1}); "
            "save it as UTF-8"
        ) from None
    except csv.Error as error:
        raise UserError(f"{csv_path}:{line_no + 1}: not a readable CSV row ({error})") from None


def take_ml_use(cells: list[str]) -> tuple[str, list[str]]:
    """A row's ML_USE (UNASSIGNED when the first cell is not one) and the cells after it."""
    ml_use = cells[0].upper()
    if ml_use in ML_USE or ml_use == UNASSIGNED:
        return ml_use, cells[1:]
    return UNASSIGNED, cells


def resolve_path(key: str, base: Path) -> Path:
    """A path as a CSV spells it: absolute, home-relative, or relative to the CSV's folder."""
    file = Path(key).expanduser()
    return file if file.is_absolute() else base / file


NOT_UTF8 = "name not UTF-8"
TOO_LARGE = "too large"  # more pixels than PIL's decompression-bomb limit
CHECK_CHUNK = 64  # files checked between two looks at whether to stop


class CheckStopped(Exception):
    """Checking a dataset's files was asked to stop (its ``should_stop`` said so)."""

    def __init__(self, checked: int, total: int) -> None:
        super().__init__(f"stopped after checking {checked} of {total} files")
        self.checked, self.total = checked, total


def problem_with(item: Any) -> str | None:
    """Why an item's image cannot be used (``missing``, ``empty``, ``broken``, ``too large``),
    or None."""
    try:
        if item.path.stat().st_size == 0:
            return "empty"
        with Image.open(item.path) as image:
            image.load()  # decode fully: a truncated file passes Image.verify()
    except FileNotFoundError:
        return "missing"
    except Image.DecompressionBombError:  # not an OSError: its header claims too many pixels
        return TOO_LARGE
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return "broken"
    return None


def checked_in_chunks(
    check: Callable[[Any], Any],
    candidates: list[Any],
    workers: int,
    should_stop: Callable[[], bool],
) -> list[Any]:
    """``check`` of every candidate, in threads, looking at ``should_stop`` between chunks (a
    large dataset's check is billed work: it must stop when the budget cannot take more)."""
    results: list[Any] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(candidates), CHECK_CHUNK):
            if should_stop():
                raise CheckStopped(start, len(candidates))
            results += pool.map(check, candidates[start : start + CHECK_CHUNK])
    return results


def keep_readable(
    manifest: ManifestBase,
    candidates: list[Any],
    workers: int,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Add the candidates whose image decodes to ``manifest.items``; skip and count the rest."""
    # PIL releases the GIL while decoding, so threads check images in parallel.
    problems = checked_in_chunks(problem_with, candidates, workers, should_stop)
    for item, problem in zip(candidates, problems, strict=True):
        if problem is None:
            manifest.items.append(item)
        else:
            manifest.skip(problem, str(item.path))


def check_trainable(
    manifest: ManifestBase,
    path: str | Path,
    unit: str,
    sizes: dict[str, int],
    train_labels: set[str],
    needs: str,
    min_labels: int = 2,
) -> None:
    """Refuse a dataset that cannot train: fewer than ``min_labels`` labels (``needs`` says
    what a model needs), a label without TRAIN ``unit``s, no VALIDATE or TEST ones (``sizes``:
    how many each split has)."""
    where = f"dataset.path={str(path)!r}"
    if len(manifest.labels) < min_labels:
        found = ", ".join(manifest.labels) or "none"
        note = f" (skipped: {manifest.skipped_text()})" if manifest.skipped else ""
        raise UserError(
            f"{where} has {len(manifest.labels)} usable label(s) ({found}); {needs}{note}"
        )
    missing = [label for label in manifest.labels if label not in train_labels]
    if missing:
        raise UserError(
            f"label(s) {', '.join(missing)} have no TRAIN {unit} in {where}; "
            f"add some or mark some rows TRAIN"
        )
    for split in (VALIDATE, TEST):
        if not sizes[split]:
            raise UserError(
                f"{where} has no {split} {unit}; add more or mark some rows {split} in the CSV"
            )


# -- labelled images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    path: Path
    labels: tuple[str, ...]  # sorted; one in a MULTICLASS dataset, any number in a MULTILABEL one
    split: str
    key: str  # the path as the dataset spells it: what the split hash and fingerprint use

    @property
    def label(self) -> str:
        """A MULTICLASS item's one label."""
        if len(self.labels) != 1:
            raise ValueError(f"{self.key} has {len(self.labels)} labels, not one")
        return self.labels[0]


@dataclass
class Manifest(ManifestBase):
    items: list[Item]
    labels: list[str]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    classification_type: str = MULTICLASS

    @property
    def multilabel(self) -> bool:
        return self.classification_type == MULTILABEL

    def fingerprint(self) -> str:
        """The datasetId: a digest of what was trained on (paths, labels, splits); a MULTICLASS
        dataset's is what it was before MULTILABEL ones were read."""
        items = sorted(self.items, key=lambda i: i.key)
        lines = [f"{item.key}\t{','.join(item.labels)}\t{item.split}" for item in items]
        if self.multilabel:
            lines.append(MULTILABEL)
        return dataset_id(lines)


def read_dataset(
    path: str | Path,
    check_workers: int = 8,
    for_training: bool = True,
    check_files: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    classification_type: str = AUTO,
) -> Manifest:
    """The readable items of a dataset; for training, also checked to be trainable (labels,
    splits); for evaluation, any labelled images will do. ``check_files=False`` reads the
    listing alone (every file taken as readable): the quick check before an operation opens.
    ``classification_type``: MULTICLASS, MULTILABEL, or auto (MULTILABEL when a CSV row has
    more than one label)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"dataset.path={str(path)!r} does not exist; give a folder or a CSV file")
    manifest = Manifest(items=[], labels=[])
    if root.is_file():
        candidates = _read_csv(root, manifest, classification_type)
    else:
        candidates = _read_folder(root, manifest)
        # A folder gives each image one label, which a MULTILABEL model may learn from too.
        multilabel = classification_type == MULTILABEL
        manifest.classification_type = MULTILABEL if multilabel else MULTICLASS
    if check_files:
        keep_readable(manifest, candidates, check_workers, should_stop)
    else:
        manifest.items = candidates
    manifest.labels = sorted({label for item in manifest.items for label in item.labels})
    if for_training:
        trained_on = {label for item in manifest.split(TRAIN) for label in item.labels}
        check_trainable(
            manifest, path, "item", manifest.counts(), trained_on,
            "a classifier needs at least two labels with readable images",
        )  # fmt: skip
    return manifest


def _read_folder(root: Path, manifest: Manifest) -> list[Item]:
    items = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = check_name("label", label_dir.name)
        for file in sorted(label_dir.rglob("*")):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            key = file.relative_to(root).as_posix()
            if not _is_text(key):  # bytes a file system allows but no text spells
                manifest.skip(NOT_UTF8, ascii(key))
                continue
            items.append(Item(file, (label,), split_for(key), key))
    return items


def _is_text(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _read_csv(csv_path: Path, manifest: Manifest, classification_type: str) -> list[Item]:
    """The CSV's items, once each; sets the manifest's classification type (see read_dataset)."""
    rows: list[tuple[int, str, str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for line_no, cells in csv_rows(csv_path):
        ml_use, key, labels = image_labels_row(cells, f"{csv_path}:{line_no}")
        if key not in seen:
            seen.add(key)
            rows.append((line_no, ml_use, key, labels))
    if classification_type == AUTO:
        several = any(len(labels) > 1 for *_, labels in rows)
        classification_type = MULTILABEL if several else MULTICLASS
    manifest.classification_type = classification_type
    items = []
    for line_no, ml_use, key, labels in rows:
        if classification_type == MULTICLASS and len(labels) > 1:
            raise UserError(
                f"{csv_path}:{line_no}: {len(labels)} labels ({', '.join(labels)}) in a "
                f"MULTICLASS dataset, which takes one an image; dataset.classification_type="
                f"MULTILABEL (or auto) reads them"
            )
        if classification_type == MULTICLASS and not labels:
            manifest.skip(NO_LABEL, key)
            continue
        split = ML_USE.get(ml_use) or split_for(key)
        items.append(Item(resolve_path(key, csv_path.parent), labels, split, key))
    return items


def image_labels_row(cells: list[str], where: str) -> tuple[str, str, tuple[str, ...]]:
    """A CSV row ``[ML_USE,]path[,label...]`` as (ML_USE, path as spelled, its labels, sorted
    and once each); a row without a path is the user's error, naming ``where`` it is."""
    ml_use, row = take_ml_use(cells)
    if not row or not row[0]:
        raise UserError(f"{where}: expected [ML_USE,]path,label but got {','.join(cells)!r}")
    labels = sorted({check_name("label", cell) for cell in row[1:] if cell})
    return ml_use, row[0], tuple(labels)


def describe(manifest: Manifest) -> str:
    counts = manifest.counts()
    return (
        f"{len(manifest.items)} images, {len(manifest.labels)} labels "
        f"(train {counts[TRAIN]}, validate {counts[VALIDATE]}, test {counts[TEST]})"
    ) + manifest.skipped_summary()
