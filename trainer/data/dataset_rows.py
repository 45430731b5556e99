"""A dataset's rows as AutoML's importData reads, checks and keeps them, for any task.

A task says how its CSV reads (its ``DatasetFormat``: ``dataset_format`` in trainer/tasks/); this
module does the rest. Every row of every input is parsed on its own: a bad row is that row's
failure (a ``google.rpc.Status`` in the operation's ``partialFailures``), never the import's.
Every file is checked as a training checks it (manifest.py's ``problem_with`` for images, the
task's probe for videos), in threads, chunk by chunk, looking between chunks at whether to stop.
The new rows are merged with those the dataset holds: an import appends, a row already there is
kept once, and a row that contradicts one there (an image under another label) fails.

The rows a dataset keeps are its task's CSV with absolute paths and AutoML's ML_USE spelled out
(TRAIN, VALIDATION, TEST or UNASSIGNED): the training's own readers read them as they are.
Nothing here imports torch.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from trainer.data.manifest import (
    CHECK_CHUNK,
    ML_USE,
    UNASSIGNED,
    CheckStopped,
    csv_rows,
    problem_with,
)
from trainer.errors import UserError
from trainer.store.automl import RpcCode

# ML_USE as AutoML's API and label stats spell it (the CSVs may also say VALIDATE).
AUTOML_SPLIT = {"TRAIN": "TRAIN", "VALIDATE": "VALIDATION", "VALIDATION": "VALIDATION",
                "TEST": "TEST", UNASSIGNED: UNASSIGNED}  # fmt: skip
MISSING = ("missing", "missing_video")  # the readers' reasons for a file that is not there
ROW_CHARS = 120  # of a row quoted in a failure's message


def automl_split(ml_use: str) -> str:
    return AUTOML_SPLIT[ml_use]


@dataclass(frozen=True)
class ImportRow:
    """One row as the dataset keeps it: ``ML_USE,path,*rest``. Rows of one ``identity`` are one
    row (an image with its labels, a box, a video segment)."""

    ml_use: str  # TRAIN, VALIDATION, TEST or UNASSIGNED
    path: Path  # absolute
    rest: tuple[str, ...]  # the cells after the path: label(s), box, times
    labels: tuple[str, ...]  # none for an image without objects (or labels, MULTILABEL)
    identity: str
    box: tuple[float, float, float, float] | None = None  # x_min, y_min, x_max, y_max in [0, 1]
    where: str = field(default="", compare=False)  # "data.csv:12": where it was read
    text: str = field(default="", compare=False)  # the row as it was given

    def cells(self) -> list[str]:
        return [self.ml_use, str(self.path), *self.rest]


@dataclass(frozen=True)
class RowFailure:
    """A row (or a whole input) that was not imported, and why."""

    code: RpcCode
    where: str
    problem: str
    text: str = ""
    labels: tuple[str, ...] = ()
    advice: str = ""  # the label-stats advice it counts for (a box refused for being small)

    def status(self) -> dict[str, Any]:
        """As AutoML reports it in ``partialFailures``: a google.rpc.Status naming the row."""
        row = f" (row: {self.text[:ROW_CHARS]})" if self.text else ""
        return {"code": int(self.code), "message": f"{self.where}: {self.problem}{row}"}


class RowProblem(ValueError):
    """A row the task's format refuses; ``advice`` and ``labels`` say what it counts for in
    the label stats."""

    def __init__(self, problem: str, labels: tuple[str, ...] = (), advice: str = "") -> None:
        super().__init__(problem)
        self.labels, self.advice = labels, advice


@dataclass(frozen=True)
class FileCheck:
    """What checking one file found: why it cannot be used, or facts for the label stats (an
    image's ``size`` [width, height], a video's ``duration``)."""

    problem: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)


class DatasetFormat(Protocol):
    """How one task's datasets read: each task's ``DATASET_FORMAT`` (trainer/tasks/)."""

    metadata_key: str  # the Dataset's field: imageObjectDetectionDatasetMetadata, ...
    unit: str  # what one example is: image, video

    def metadata(self, classification_type: str | None) -> dict[str, Any]:
        """The Dataset's metadata field's value; a type the task does not take is refused."""

    def read(self, source: Path, metadata: dict[str, Any]) -> Iterator[ImportRow | RowFailure]:
        """Every row of ``source`` (an absolute path: a CSV, or a folder where the task reads
        one), parsed, or its failure, as the dataset takes them (``metadata``: the value of its
        metadata field, e.g. ``{"classificationType": "MULTILABEL"}``)."""

    def check_file(self, path: Path) -> FileCheck:
        """The file checked as a training checks it."""

    def row_problem(self, row: ImportRow, facts: dict[str, Any]) -> str | None:
        """Why a row cannot be used given its file's facts (a segment past a video's end)."""

    def trainable(self, rows_csv: Path, metadata: dict[str, Any]) -> str | None:
        """Why the dataset's rows cannot train yet (the training's own check, reading them as
        ``metadata`` says), or None."""


# -- reading -----------------------------------------------------------------------------------


def no_classification_type(classification_type: str | None, dataset: str) -> dict[str, Any]:
    """The dataset metadata of a task other than image classification: an empty message, and a
    ``classificationType`` refused (``dataset``: "an object detection dataset", ...)."""
    if classification_type:
        raise UserError(f"classificationType is image classification's: {dataset} takes none")
    return {}


def csv_import_rows(
    source: Path, parse: Callable[[list[str], Path, str], ImportRow]
) -> Iterator[ImportRow | RowFailure]:
    """Each row of a CSV parsed by ``parse(cells, base folder, where)``; its failure instead
    where ``parse`` refuses it (a UserError or ValueError) or its ML_USE is none of AutoML's.
    A file that is no UTF-8 CSV fails from the row it cannot read on."""
    try:
        for line_no, cells in csv_rows(source):
            where, text = f"{source}:{line_no}", ",".join(cells)
            try:
                unknown_ml_use(cells)
                yield replace(parse(cells, source.parent, where), where=where, text=text)
            except (UserError, ValueError) as error:
                problem = str(error).removeprefix(f"{where}: ")
                labels, advice = getattr(error, "labels", ()), getattr(error, "advice", "")
                yield RowFailure(RpcCode.INVALID_ARGUMENT, where, problem, text, labels, advice)
    except UserError as error:  # csv_rows: not UTF-8, or not CSV
        yield RowFailure(RpcCode.INVALID_ARGUMENT, str(source), str(error))


def unknown_ml_use(cells: list[str]) -> None:
    """Refuse a first cell that is a word where ML_USE goes, followed by a path: a misspelt
    ML_USE (TRAINING) would otherwise be read as a path, and the path as a label. Labels never
    hold a dot or a slash, paths nearly always do."""
    first = cells[0]
    if first.upper() in ML_USE or first.upper() == UNASSIGNED or len(cells) < 2:
        return
    if re.fullmatch(r"[A-Za-z_]+", first) and re.search(r"[./\\]", cells[1]):
        raise RowProblem(
            f"unknown ML_USE {first[:40]!r}: use TRAIN, VALIDATION, TEST or UNASSIGNED"
        )


def read_sources(
    dataset_format: DatasetFormat, sources: Iterable[Path], metadata: dict[str, Any]
) -> tuple[list[ImportRow], list[RowFailure]]:
    """Every input's rows, parsed as the dataset of ``metadata`` takes them; the failures of
    those that did not parse."""
    rows: list[ImportRow] = []
    failures: list[RowFailure] = []
    for source in sources:
        for found in dataset_format.read(source, metadata):
            (failures if isinstance(found, RowFailure) else rows).append(found)  # type: ignore[arg-type]
    return rows, failures


# -- checking ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    path: Path  # what problem_with reads of an item


def check_image(path: Path) -> FileCheck:
    """An image as a training checks it (decoded whole), and its size."""
    problem = problem_with(_File(path))
    if problem is not None:
        return FileCheck(problem)
    with Image.open(path) as image:  # the header again, from the cache: its size
        return FileCheck(facts={"size": list(image.size)})


def check_rows(
    dataset_format: DatasetFormat,
    rows: list[ImportRow],
    workers: int,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> tuple[list[ImportRow], dict[str, dict[str, Any]], list[RowFailure]]:
    """The rows whose file (each checked once, in threads) and facts pass; the facts of every
    good file by path; the failures. Raises CheckStopped when ``should_stop`` says so."""
    paths = sorted({str(row.path) for row in rows})
    checks: dict[str, FileCheck] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), CHECK_CHUNK):
            if should_stop():
                raise CheckStopped(start, len(paths))
            chunk = paths[start : start + CHECK_CHUNK]
            found = pool.map(lambda p: dataset_format.check_file(Path(p)), chunk)
            checks.update(zip(chunk, found, strict=True))
            progress(len(checks), len(paths))
    kept: list[ImportRow] = []
    failures: list[RowFailure] = []
    for row in rows:
        check = checks[str(row.path)]
        problem = check.problem or dataset_format.row_problem(row, check.facts)
        if problem is None:
            kept.append(row)
            continue
        code = RpcCode.NOT_FOUND if problem in MISSING else RpcCode.INVALID_ARGUMENT
        if check.problem:
            problem = f"{check.problem} file {row.path}"
        failures.append(RowFailure(code, row.where, problem, row.text))
    facts = {path: check.facts for path, check in checks.items() if check.problem is None}
    return kept, facts, failures


# -- merging and keeping -----------------------------------------------------------------------


def merge(
    held: list[ImportRow], new: list[ImportRow]
) -> tuple[list[ImportRow], int, list[RowFailure]]:
    """``held`` and the new rows after them; how many were added; the new rows that contradict
    one already held (a row of the same identity, otherwise written). A row repeated as it is
    is kept once, quietly: importing a file again adds nothing."""
    by_identity = {row.identity: row for row in held}
    merged, failures = list(held), []
    for row in new:
        earlier = by_identity.get(row.identity)
        if earlier is None:
            by_identity[row.identity] = row
            merged.append(row)
        elif earlier.cells() != row.cells():
            failures.append(RowFailure(
                RpcCode.ALREADY_EXISTS, row.where,
                f"already in the dataset as {','.join(earlier.cells())[:ROW_CHARS]}", row.text,
            ))  # fmt: skip
    return merged, len(merged) - len(held), failures


def write_rows(rows: Iterable[ImportRow], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(row.cells() for row in rows)


def trainability(read: Callable[[Path], Any], rows_csv: Path) -> str | None:
    """The training's own check of the rows (``read``: the task's reader, listing only), as a
    message about "the dataset" rather than the file a training would name; None when it
    passes."""
    try:
        read(rows_csv)
    except UserError as error:
        return str(error).replace(f"dataset.path={str(rows_csv)!r}", "the dataset")
    return None
