"""Batch prediction over images, as AutoML writes it; what image classification and object
detection share (each task turns a batch of pixels into its own JSONL records).

The input CSV has one image path per line: a local path, or with ``--allow-remote`` an http,
https, gs or s3 URL (what else a row may name: prediction_inputs.py); a path with spaces in
double quotes. Results go to the prediction folder as ``<prefix>_1.jsonl``, ... with one line per
image, and ``errors_1.jsonl``, ... for the images that are missing, refused, over Pillow's pixel
limit or cannot be decoded. Those never stop the job; a malformed CSV, or one where every image
fails, does.

Images are decoded in DataLoader worker processes, in input order; each file holds at most
``shard_size`` images, and an image never spans two files.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from trainer.data.prediction_inputs import (
    LOCAL_ONLY,
    Refused,
    SourcePolicy,
    is_timeout,
    open_image_input,
)
from trainer.errors import UserError
from trainer.store.automl import RpcCode

ERRORS_PREFIX = "errors"
BATCH_SIZE = 32


def input_text(path: Path) -> str:
    """A batch-prediction input file's text; a missing or non-UTF-8 file is the user's error."""
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig")  # a spreadsheet's BOM is not part of a path
    except UnicodeDecodeError as error:
        raise UserError(
            f"--input {path} is not UTF-8 text (byte {error.start}); save it as UTF-8"
        ) from None


def read_input_csv(path: Path) -> list[str]:
    """The image paths of a batch-prediction CSV, as given (quotes removed)."""
    text = input_text(path)
    rows = []
    try:
        for number, row in enumerate(csv.reader(io.StringIO(text), strict=True), start=1):
            cells = [cell.strip() for cell in row]
            if not any(cells):
                continue  # blank lines
            if len(cells) != 1 or not cells[0]:
                raise UserError(
                    f"--input {path}, line {number}: expected one image path per line, "
                    f"got {len(cells)} fields; quote paths that contain commas"
                )
            rows.append(cells[0])
    except csv.Error as error:
        raise UserError(f"--input {path} is not a valid CSV: {error}") from None
    if not rows:
        raise UserError(f"--input {path} lists no images")
    return rows


class ShardedJsonl:
    """``<prefix>_1.jsonl``, ``<prefix>_2.jsonl``, ...: at most ``shard_size`` lines per file,
    files created only when there is a line to write."""

    def __init__(self, folder: Path, prefix: str, shard_size: int) -> None:
        self.folder, self.prefix, self.shard_size = folder, prefix, shard_size
        self.lines = 0
        self.files: list[Path] = []
        self._out: TextIO | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self.lines % self.shard_size == 0:
            self._next_file()
        assert self._out is not None
        self._out.write(json.dumps(record) + "\n")
        self.lines += 1

    def _next_file(self) -> None:
        self.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.prefix}_{len(self.files) + 1}.jsonl"
        self.files.append(path)
        self._out = path.open("w", encoding="utf-8")

    def close(self) -> None:
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
            self._out = None


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(cell: str) -> str:
    """A CSV cell that a spreadsheet shows as text: one starting like a formula (an input path
    such as ``=HYPERLINK(...)``) gets a leading apostrophe, OWASP's advice for CSV injection."""
    return f"'{cell}" if cell.startswith(FORMULA_STARTS) else cell


def error_record(image_id: str, code: int, message: str) -> dict[str, Any]:
    return {"ID": image_id, "errors": {"code": code, "message": message}}


# -- decoding ------------------------------------------------------------------------------


@dataclass
class Decoded:
    index: int
    pixels: Any  # a tensor, or None when the image failed
    code: int = 0
    message: str = ""


class InputImages:
    """A torch Dataset over the input paths; a failure is returned, never raised, so that one
    bad image cannot stop the job."""

    def __init__(
        self, paths: Sequence[str], base: Path, transform: Callable, sources: SourcePolicy
    ) -> None:
        self.paths, self.base, self.transform = list(paths), base, transform
        self.sources = sources

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        path = self.paths[index]
        try:
            return Decoded(index, self.transform(self._image(path)))
        except Refused as refused:
            return Decoded(index, None, refused.code, str(refused))
        except Exception as error:  # PIL raises many types for broken or truncated files
            return Decoded(index, None, *self._failure(path, error))

    def _failure(self, path: str, error: Exception) -> tuple[RpcCode, str]:
        if is_timeout(error):  # fsspec's http says FileNotFoundError, from the timeout
            waited = self.sources.remote_timeout_seconds or 0.0
            return RpcCode.DEADLINE_EXCEEDED, f"{path}: no answer within {waited:g} s"
        if isinstance(error, FileNotFoundError):
            return RpcCode.NOT_FOUND, f"{path}: no such file"
        return RpcCode.INVALID_ARGUMENT, f"cannot decode {path}: {type(error).__name__}: {error}"

    def _image(self, path: str) -> Any:
        with open_image_input(path, self.base, self.sources) as handle:
            return rgb_image(handle, path)


def rgb_image(handle: Any, name: str) -> Any:
    """An image file's pixels in RGB (batch and online prediction); one over Pillow's pixel
    limit is Refused before decoding."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # Pillow only warns between one and two times its limit, and decodes: each image can
        # take half a gigabyte, a batch of them the machine's memory.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
            raise Refused(RpcCode.INVALID_ARGUMENT, f"{name}: {error}") from None
    with image:
        return image.convert("RGB")


def collate(batch: list[Decoded]) -> list[Decoded]:
    return batch  # the model stacks the good ones; failures stay in place for their records


def batches(dataset: InputImages, workers: int) -> Iterator[list[Decoded]]:
    from torch.utils.data import DataLoader

    yield from DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        num_workers=workers,
        collate_fn=collate,
        prefetch_factor=4 if workers else None,
    )


# -- the job -------------------------------------------------------------------------------


# The operation lists this many failed inputs (AutoML's partialFailures), each message cut to
# MAX_FAILURE_CHARS; the output files list all. The operation is also a run tag, which MLflow
# caps at 8,000 characters.
MAX_PARTIAL_FAILURES = 20
MAX_FAILURE_CHARS = 200


def add_failure(failures: list[dict[str, Any]], code: int, message: str) -> None:
    """Keep a failed input for the operation's ``partialFailures`` (a ``google.rpc.Status``)."""
    if len(failures) < MAX_PARTIAL_FAILURES:
        failures.append({"code": int(code), "message": message[:MAX_FAILURE_CHARS]})


def add_status(failures: list[dict[str, Any]], path: str, status: str) -> None:
    """``add_failure`` for a status written as ``NOT_FOUND: message`` (AutoML Video's CSV)."""
    name, _, message = status.partition(": ")
    add_failure(failures, RpcCode.named(name), f"{path}: {message or status}")


@dataclass
class PredictionResult:
    """What a task's prediction wrote, for the verb's summary line and its operation."""

    folder: Path
    predicted: int
    failed: int
    result_files: list[Path]
    error_files: list[Path]
    seconds: float
    # The first failed inputs (add_failure), each a google.rpc.Status.
    partial_failures: list[dict[str, Any]] = field(default_factory=list)
    # AutoML's BatchPredictResult.metadata (detection: max_bounding_box_count).
    response_metadata: dict[str, str] = field(default_factory=dict)


Records = Callable[[Any, list[str]], list[dict[str, Any]]]  # (pixels, IDs) -> JSONL records


def predict_images(
    records: Records,
    paths: Sequence[str],
    base: Path,
    transform: Callable,
    folder: Path,
    results_prefix: str,
    shard_size: int = 1000,
    workers: int = 2,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    sources: SourcePolicy = LOCAL_ONLY,
) -> PredictionResult:
    """Run the model over every image; write results and errors; fail if nothing succeeded."""
    import torch

    started = time.monotonic()
    # Decoding workers and the model's threads share the cores: more busy threads than cores
    # makes PyTorch's OpenMP threads spin and wait (measured: 0.46 of the bare model's speed
    # with 2 workers and 2 threads on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    results = ShardedJsonl(folder, results_prefix, shard_size)
    errors = ShardedJsonl(folder, ERRORS_PREFIX, shard_size)
    failures: list[dict[str, Any]] = []
    first_error = ""
    done = 0
    try:
        with torch.inference_mode():
            for batch in batches(InputImages(paths, base, transform, sources), workers):
                good = [item for item in batch if item.pixels is not None]
                if good:
                    pixels = torch.stack([item.pixels for item in good])
                    for record in records(pixels, [paths[item.index] for item in good]):
                        results.write(record)
                for item in batch:
                    if item.pixels is None:
                        errors.write(error_record(paths[item.index], item.code, item.message))
                        add_failure(failures, item.code, f"{paths[item.index]}: {item.message}")
                        first_error = first_error or item.message
                done += len(batch)
                on_progress(done, len(paths))
    finally:
        torch.set_num_threads(threads)
        results.close()
        errors.close()
    if results.lines == 0:
        raise UserError(
            f"every one of the {len(paths)} images failed (first: {first_error}); "
            f"see {errors.files[0]}"
        )
    return PredictionResult(
        folder, results.lines, errors.lines, results.files, errors.files,
        time.monotonic() - started, failures,
    )  # fmt: skip


def predict_request(
    records: Records, transform: Callable, results_prefix: str, request: Any
) -> PredictionResult:
    """``predict_images`` for a task's PredictRequest: its rows, base folder, output folder,
    ``--shard-size`` and ``--workers``, progress callback and what its rows may name."""
    options = request.options
    return predict_images(
        records, request.rows, request.base, transform, request.folder, results_prefix,
        options.shard_size, options.workers, request.progress, request.sources,
    )  # fmt: skip


def default_workers() -> int:
    """Decoding processes: one per four cores, at most 4. On 2 cores, decoding in the main
    process between batches is fastest (0.74 of the bare model against 0.46 with 2 workers,
    benchmarks/predict_throughput.py): the model's threads need both cores."""
    return min(4, (os.cpu_count() or 1) // 4)
