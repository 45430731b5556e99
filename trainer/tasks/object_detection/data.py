"""Reading an object-detection dataset (AutoML's CSV) into a manifest of images and their boxes.

One row per box, several rows per image, as AutoML reads them:

    [ML_USE,]path,label,x_min,y_min,,,x_max,y_max,,        two vertices
    [ML_USE,]path,label,x1,y1,x2,y2,x3,y3,x4,y4            four vertices (any order)
    [ML_USE,]path                                          an image with no object: a negative

Coordinates are fractions of the image's width and height. A box outside [0, 1], inverted, or
with an edge under 0.01 is skipped and counted; so is a missing or unreadable image. ML_USE,
the split hash, the name rule and the image checks are trainer/data/manifest.py's. Nothing here
imports torch: the management CLI and the config checks stay fast.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.dataset_rows import (
    FileCheck,
    ImportRow,
    RowFailure,
    RowProblem,
    automl_split,
    check_image,
    csv_import_rows,
    no_classification_type,
    trainability,
)
from trainer.data.label_stats import SMALL_BOXES
from trainer.data.manifest import (
    ML_USE,
    SPLITS,
    TEST,
    TRAIN,
    VALIDATE,
    ManifestBase,
    check_trainable,
    csv_rows,
    dataset_id,
    keep_readable,
    resolve_path,
    split_for,
    take_ml_use,
)
from trainer.errors import UserError
from trainer.store.automl import RpcCode
from trainer.store.resources import check_name

MIN_EDGE = 0.01  # AutoML's smallest box edge, as a fraction of the image
# Skip reasons for boxes (images use trainer/data/manifest.py's: missing, empty, broken).
OUTSIDE, INVERTED, TOO_SMALL = "box outside [0, 1]", "inverted box", "box edge < 0.01"
NO_GOOD_BOX = "image whose boxes were all skipped"
CSV_FORM = "[ML_USE,]path[,label,x_min,y_min,,,x_max,y_max,,]"


@dataclass(frozen=True)
class Box:
    """One labelled box, in fractions of the image's width (x) and height (y)."""

    label: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x_min, self.y_min, self.x_max, self.y_max)


@dataclass(frozen=True)
class DetectionItem:
    """One image, as the image manifest's Item, with its boxes instead of a label (none: a
    negative)."""

    path: Path
    split: str
    key: str  # the path as the dataset spells it: what the split hash and fingerprint use
    boxes: tuple[Box, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [box.label for box in self.boxes]


@dataclass
class DetectionManifest(ManifestBase):
    items: list[DetectionItem]
    labels: list[str]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)

    def box_counts(self) -> dict[str, int]:
        return {name: sum(len(item.boxes) for item in self.split(name)) for name in SPLITS}

    def fingerprint(self) -> str:
        """The datasetId: a digest of what was trained on (paths, splits, boxes and labels)."""

        def line(item: DetectionItem) -> str:
            boxes = ";".join(
                f"{b.label}:{b.x_min:.6f},{b.y_min:.6f},{b.x_max:.6f},{b.y_max:.6f}"
                for b in item.boxes
            )
            return f"{item.key}\t{item.split}\t{boxes}"

        return dataset_id(map(line, sorted(self.items, key=lambda i: i.key)))


def read_detection_dataset(
    path: str | Path,
    check_workers: int = 8,
    for_training: bool = True,
    min_labels: int = 2,
    check_files: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> DetectionManifest:
    """The manifest of a detection CSV (or of a folder holding exactly one CSV); for training,
    also checked to be trainable (labels, boxes in every split), as trainer/data/manifest.py does;
    ``check_files=False`` reads the CSV alone (every image taken as readable).

    ``min_labels`` follows DESIGN.md's "fewer than two labels is an error"; a one-label detector
    is meaningful (objects against background), so a caller may lower it to 1.
    """
    csv_path = _csv_file(path)
    manifest = DetectionManifest(items=[], labels=[])
    candidates = _read_csv(csv_path, manifest)
    if check_files:
        keep_readable(manifest, candidates, check_workers, should_stop)
    else:
        manifest.items = candidates
    manifest.labels = sorted({label for item in manifest.items for label in item.labels})
    if for_training:
        check_trainable(
            manifest, path, "box", manifest.box_counts(),
            {label for item in manifest.split(TRAIN) for label in item.labels},
            f"a detector needs at least {min_labels} label(s) with boxes on readable images",
            min_labels,
        )  # fmt: skip
    return manifest


def _csv_file(path: str | Path) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"dataset.path={str(path)!r} does not exist; give a detection CSV file")
    if root.is_file():
        return root
    found = sorted(root.glob("*.csv"))
    if len(found) != 1:
        raise UserError(
            f"dataset.path={str(path)!r} is a folder with {len(found)} CSV files; object "
            f"detection reads one CSV of rows {CSV_FORM}: give its path"
        )
    return found[0]


def _read_csv(csv_path: Path, manifest: DetectionManifest) -> list[DetectionItem]:
    """Group the rows by image, keeping each image's first split and its good boxes."""
    splits: dict[str, str] = {}
    boxes: dict[str, list[Box]] = {}
    had_boxes: set[str] = set()
    for line_no, row in csv_rows(csv_path):
        ml_use, key, box = _parse_row(row, f"{csv_path}:{line_no}")
        splits.setdefault(key, ML_USE.get(ml_use) or split_for(key))
        boxes.setdefault(key, [])
        if box is None:
            continue
        had_boxes.add(key)
        problem = box_problem(box)
        if problem:
            manifest.skip(problem, f"{csv_path.name}:{line_no} {key}")
        else:
            boxes[key].append(box)
    items = []
    for key, split in splits.items():
        if key in had_boxes and not boxes[key]:
            # Its objects are still in the picture: kept as a negative, it would teach the
            # detector that they are background.
            manifest.skip(NO_GOOD_BOX, key)
            continue
        path = resolve_path(key, csv_path.parent)
        items.append(DetectionItem(path, split, key, tuple(boxes[key])))
    return items


def _parse_row(row: list[str], where: str) -> tuple[str, str, Box | None]:
    """(ML_USE, path, box or None for a negative row); a malformed row is the user's error."""
    ml_use, row = take_ml_use(row)
    if not row or not row[0]:
        raise UserError(f"{where}: expected {CSV_FORM} but the path is missing")
    key, rest = row[0], row[1:]
    if not any(rest):
        return ml_use, key, None
    label = check_name("label", rest[0]) if rest[0] else ""
    coordinates = _coordinates(rest[1:], where)
    if not label or coordinates is None:
        raise UserError(
            f"{where}: expected {CSV_FORM} with a label and a box (two or four vertices) "
            f"but got {','.join(row)!r}"
        )
    if len(coordinates) == 4:  # x_min, y_min, x_max, y_max: an inverted box stays inverted
        return ml_use, key, Box(label, *coordinates)
    # Four vertices may come in any order; the box is their extent.
    xs, ys = coordinates[0::2], coordinates[1::2]
    return ml_use, key, Box(label, min(xs), min(ys), max(xs), max(ys))


def _coordinates(cells: list[str], where: str) -> list[float] | None:
    """The filled vertex coordinates: x_min,y_min,,,x_max,y_max,, or x1,y1,...,x4,y4."""
    if any(cells[8:]):
        return None
    cells = (cells + [""] * 8)[:8]  # trailing empty cells may be left out
    try:
        values = [float(cell) if cell else None for cell in cells]
    except ValueError:
        raise UserError(
            f"{where}: box coordinates must be numbers in [0, 1], got {','.join(cells)!r}"
        ) from None
    two_vertices = [values[i] for i in (0, 1, 4, 5)]
    if all(v is not None for v in values):
        return values  # type: ignore[return-value]
    if all(v is not None for v in two_vertices) and values[2:4] == values[6:8] == [None, None]:
        return two_vertices  # type: ignore[return-value]
    return None


def box_problem(box: Box) -> str | None:
    """Why AutoML would refuse this box, or None."""
    if any(not 0.0 <= v <= 1.0 for v in box.as_tuple()):
        return OUTSIDE
    if box.x_max <= box.x_min or box.y_max <= box.y_min:
        return INVERTED
    if min(box.x_max - box.x_min, box.y_max - box.y_min) < MIN_EDGE:
        return TOO_SMALL
    return None


def describe(manifest: DetectionManifest) -> str:
    counts, boxes = manifest.counts(), manifest.box_counts()
    negatives = sum(1 for item in manifest.items if not item.boxes)
    text = (
        f"{len(manifest.items)} images ({negatives} without boxes), "
        f"{sum(boxes.values())} boxes, {len(manifest.labels)} labels "
        f"(train {counts[TRAIN]}/{boxes[TRAIN]}, validate {counts[VALIDATE]}/{boxes[VALIDATE]}, "
        f"test {counts[TEST]}/{boxes[TEST]} images/boxes)"
    )
    return text + manifest.skipped_summary()


# -- importing into a dataset (trainer/data/dataset_rows.py) -----------------------------------


class DetectionFormat:
    """A detection CSV as a dataset import reads it: each box row on its own, a box the
    training would skip (outside, inverted, an edge under 0.01) refused with its row."""

    metadata_key = "imageObjectDetectionDatasetMetadata"
    unit = "image"

    def metadata(self, classification_type: str | None) -> dict[str, Any]:
        return no_classification_type(classification_type, "an object detection dataset")

    def read(self, source: Path, metadata: dict[str, Any]) -> Iterator[ImportRow | RowFailure]:
        try:
            csv_path = _csv_file(source)
        except UserError as error:
            yield RowFailure(RpcCode.INVALID_ARGUMENT, str(source), str(error))
            return
        yield from csv_import_rows(csv_path, _import_row)

    def check_file(self, path: Path) -> FileCheck:
        return check_image(path)

    def row_problem(self, row: ImportRow, facts: dict[str, Any]) -> str | None:
        return None

    def trainable(self, rows_csv: Path, metadata: dict[str, Any]) -> str | None:
        return trainability(lambda path: read_detection_dataset(path, check_files=False), rows_csv)


def _import_row(cells: list[str], base: Path, where: str) -> ImportRow:
    ml_use, key, box = _parse_row(cells, where)
    path = Path(os.path.abspath(resolve_path(key, base)))
    split = automl_split(ml_use)
    if box is None:  # an image without objects
        return ImportRow(split, path, (), (), f"{path}\tnone")
    problem = box_problem(box)
    if problem:
        raise RowProblem(problem, (box.label,), SMALL_BOXES if problem == TOO_SMALL else "")
    x_min, y_min, x_max, y_max = (f"{v:.6f}" for v in box.as_tuple())
    rest = (box.label, x_min, y_min, "", "", x_max, y_max, "", "")
    identity = "\t".join([str(path), *rest])  # the same box under another ML_USE contradicts
    return ImportRow(split, path, rest, (box.label,), identity, box.as_tuple())


DATASET_FORMAT = DetectionFormat()
