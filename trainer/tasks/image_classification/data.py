"""Image classification's datasets as a dataset import reads them (trainer/data/dataset_rows.py):
a folder with one sub-folder per label, or AutoML's CSV, the forms that trainer/data/manifest.py
reads for a training. A MULTICLASS dataset takes rows ``[ML_USE,]path,label``; a MULTILABEL one
``[ML_USE,]path[,label1,label2,...]`` (a path alone: an image with none of the labels), each
image's labels kept sorted, once each. Nothing here imports torch.
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
    RowProblem,
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
        if chosen not in (MULTICLASS, MULTILABEL):
            raise UserError(f"classificationType {classification_type!r} is invalid; use "
                            f"{MULTICLASS} or {MULTILABEL}")  # fmt: skip
        return {"classificationType": chosen}

    def read(self, source: Path, metadata: dict[str, Any]) -> Iterator[ImportRow | RowFailure]:
        if source.is_dir():
            yield from _folder(source)
        else:
            multilabel = _type_of(metadata) == MULTILABEL
            yield from csv_import_rows(source, _multilabel_row if multilabel else _multiclass_row)

    def check_file(self, path: Path) -> FileCheck:
        return check_image(path)

    def row_problem(self, row: ImportRow, facts: dict[str, Any]) -> str | None:
        return None

    def trainable(self, rows_csv: Path, metadata: dict[str, Any]) -> str | None:
        kind = _type_of(metadata)  # the training reads the rows as the dataset's type
        return trainability(
            lambda path: manifest.read_dataset(path, check_files=False, classification_type=kind),
            rows_csv,
        )


def _type_of(metadata: dict[str, Any]) -> str:
    """The dataset's classificationType (MULTICLASS for one created without)."""
    return str(metadata.get("classificationType") or MULTICLASS)


def _folder(root: Path) -> Iterator[ImportRow | RowFailure]:
    """A folder's images, UNASSIGNED (a folder names no split); what its reader skips fails."""
    try:
        found = manifest.read_dataset(root, for_training=False, check_files=False)
    except UserError as error:  # a sub-folder whose name is no label
        yield RowFailure(RpcCode.INVALID_ARGUMENT, str(root), str(error))
        return
    for item in found.items:
        yield _image(manifest.UNASSIGNED, item.path, item.labels, str(item.path))
    for reason, count in sorted(found.skipped.items()):
        example = found.skipped_examples[reason]
        yield RowFailure(RpcCode.INVALID_ARGUMENT, str(root),
                         f"{count} file(s) skipped: {reason} (e.g. {example})")  # fmt: skip


def _multilabel_row(cells: list[str], base: Path, where: str) -> ImportRow:
    ml_use, key, labels = manifest.image_labels_row(cells, where)
    return _image(ml_use, manifest.resolve_path(key, base), labels, where)


def _multiclass_row(cells: list[str], base: Path, where: str) -> ImportRow:
    row = _multilabel_row(cells, base, where)
    if len(row.labels) > 1:
        raise RowProblem(
            f"{len(row.labels)} labels ({', '.join(row.labels)}) in a MULTICLASS dataset, which "
            "takes one label an image (a MULTILABEL dataset takes several)"
        )
    if not row.labels:
        raise RowProblem("expected [ML_USE,]path,label: a MULTICLASS dataset takes one label "
                         "an image")  # fmt: skip
    return row


def _image(ml_use: str, path: Path, labels: tuple[str, ...], where: str) -> ImportRow:
    # Absolute, symbolic links kept as the user named them; the image is one row, whatever its
    # labels (sorted, once each): another row of it with other labels contradicts it.
    absolute = Path(os.path.abspath(path))
    split = automl_split(ml_use)
    return ImportRow(split, absolute, labels, labels, str(absolute), where=where)


DATASET_FORMAT = ImageClassificationFormat()
