"""Image classification's datasets as a dataset import reads them (trainer/data/dataset_rows.py):
a folder with one sub-folder per label, or AutoML's CSV ``[ML_USE,]path,label``, the forms that
trainer/data/manifest.py reads for a training. Nothing here imports torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trainer.data import manifest
from trainer.data.dataset_rows import (
    FileCheck,
    ImportRow,
    RowFailure,
    automl_split,
    check_image,
    csv_import_rows,
    trainability,
)
from trainer.errors import UserError
from trainer.settings import MULTICLASS, MULTILABEL
from trainer.store.automl import RpcCode


class ImageClassificationFormat:
    metadata_key = "imageClassificationDatasetMetadata"
    unit = "image"

    def metadata(self, classification_type: str | None) -> dict[str, Any]:
        chosen = (classification_type or MULTICLASS).upper()
        if chosen == MULTILABEL:
            raise UserError(
                "classificationType MULTILABEL datasets on record are not supported yet: train "
                "on a multi-label CSV with dataset.path= instead, or use MULTICLASS (one label "
                "an image)"
            )
        if chosen != MULTICLASS:
            raise UserError(f"classificationType {classification_type!r} is invalid; use "
                            f"{MULTICLASS}")  # fmt: skip
        return {"classificationType": MULTICLASS}

    def read(self, source: Path) -> Iterator[ImportRow | RowFailure]:
        if source.is_dir():
            yield from _folder(source)
        else:
            yield from csv_import_rows(source, _csv_row)

    def check_file(self, path: Path) -> FileCheck:
        return check_image(path)

    def row_problem(self, row: ImportRow, facts: dict[str, Any]) -> str | None:
        return None

    def trainable(self, rows_csv: Path) -> str | None:
        return trainability(lambda path: manifest.read_dataset(path, check_files=False), rows_csv)


def _folder(root: Path) -> Iterator[ImportRow | RowFailure]:
    """A folder's images, UNASSIGNED (a folder names no split); what its reader skips fails."""
    try:
        found = manifest.read_dataset(root, for_training=False, check_files=False)
    except UserError as error:  # a sub-folder whose name is no label
        yield RowFailure(RpcCode.INVALID_ARGUMENT, str(root), str(error))
        return
    for item in found.items:
        yield _image(manifest.UNASSIGNED, item.path, item.label, str(item.path))
    for reason, count in sorted(found.skipped.items()):
        example = found.skipped_examples[reason]
        yield RowFailure(RpcCode.INVALID_ARGUMENT, str(root),
                         f"{count} file(s) skipped: {reason} (e.g. {example})")  # fmt: skip


def _csv_row(cells: list[str], base: Path, where: str) -> ImportRow:
    ml_use, key, label = manifest.image_row(cells, where)
    return _image(ml_use, manifest.resolve_path(key, base), label, where)


def _image(ml_use: str, path: Path, label: str, where: str) -> ImportRow:
    # Absolute, symbolic links kept as the user named them; one label an image (MULTICLASS).
    absolute = Path(os.path.abspath(path))
    return ImportRow(automl_split(ml_use), absolute, (label,), (label,), str(absolute), where=where)


DATASET_FORMAT = ImageClassificationFormat()
