"""Batch prediction, as AutoML writes it: `python -m trainer predict ID --input CSV --output DIR`.

The input CSV has one image path per line (a local path or any fsspec URL; a path with spaces
in double quotes). Results go to ``DIR/prediction-<display name>-<UTC timestamp>/``:
``image_classification_1.jsonl``, ... with one line per image, and ``errors_1.jsonl``, ... for
the images that are missing or cannot be decoded. Those never stop the job; a malformed CSV, or
one where every image fails, does.

Images are decoded in DataLoader worker processes, in input order; each file holds at most
``shard_size`` images, and an image never spans two files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from trainer.errors import UserError

log = logging.getLogger("trainer")

NOT_FOUND, INVALID_ARGUMENT = 5, 3  # google.rpc.Code
RESULTS_PREFIX = "image_classification"
ERRORS_PREFIX = "errors"
BATCH_SIZE = 32


def read_input_csv(path: Path) -> list[str]:
    """The image paths of a batch-prediction CSV, as given (quotes removed)."""
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is not a path
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


def output_folder(output: Path, display_name: str) -> Path:
    """AutoML's name: ``prediction-<display name>-<timestamp of the call, ISO 8601 UTC>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    folder = output / f"prediction-{display_name}-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


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


def classification_record(
    image_id: str, scores: np.ndarray, labels: Sequence[str], threshold: float
) -> dict[str, Any]:
    """AutoML's JSONL line: the labels scoring at least ``threshold``, best first."""
    order = np.argsort(-scores, kind="stable")
    return {
        "ID": image_id,
        "annotations": [
            {
                "annotationSpecId": str(index),
                "displayName": labels[index],
                "classification": {"score": float(scores[index])},
            }
            for index in order
            if scores[index] >= threshold
        ],
    }


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

    def __init__(self, paths: Sequence[str], base: Path, transform: Callable) -> None:
        self.paths, self.base, self.transform = list(paths), base, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Decoded:
        from PIL import Image

        try:
            with open_image_file(self.paths[index], self.base) as handle, Image.open(handle) as im:
                return Decoded(index, self.transform(im.convert("RGB")))
        except FileNotFoundError:
            return Decoded(index, None, NOT_FOUND, f"{self.paths[index]}: no such file")
        except Exception as error:  # PIL raises many types for broken or truncated files
            message = f"cannot decode {self.paths[index]}: {type(error).__name__}: {error}"
            return Decoded(index, None, INVALID_ARGUMENT, message)


def open_image_file(path: str, base: Path):
    """Local paths (relative ones to the CSV's folder) directly; URLs through fsspec."""
    if "://" in path and not path.startswith("file://"):
        import fsspec

        return fsspec.open(path, "rb").open()
    local = Path(path.removeprefix("file://")).expanduser()
    return (local if local.is_absolute() else base / local).open("rb")


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


@dataclass
class PredictionResult:
    folder: Path
    predicted: int
    failed: int
    result_files: list[Path]
    error_files: list[Path]
    seconds: float


Records = Callable[[Any, list[str]], list[dict[str, Any]]]  # (pixels, IDs) -> JSONL records


def classification_records(network: Any, labels: Sequence[str], threshold: float) -> Records:
    def records(pixels: Any, ids: list[str]) -> list[dict[str, Any]]:
        scores = network(pixels).float().softmax(dim=1).numpy()
        pairs = zip(ids, scores, strict=True)
        return [classification_record(i, row, labels, threshold) for i, row in pairs]

    return records


def detection_records(
    network: Any, labels: Sequence[str], threshold: float, max_boxes: int
) -> Records:
    from trainer.tasks.object_detection.module import ServingDetector
    from trainer.tasks.object_detection.predict import record_from_rows

    serving = ServingDetector(network.eval())

    def records(pixels: Any, ids: list[str]) -> list[dict[str, Any]]:
        rows = serving(pixels).numpy()
        pairs = zip(ids, rows, strict=True)
        return [record_from_rows(i, r, labels, threshold, max_boxes) for i, r in pairs]

    return records


def predict_images(
    records: Records,
    paths: Sequence[str],
    base: Path,
    transform: Callable,
    folder: Path,
    results_prefix: str = RESULTS_PREFIX,
    shard_size: int = 1000,
    workers: int = 2,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
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
    first_error = ""
    done = 0
    try:
        with torch.inference_mode():
            for batch in batches(InputImages(paths, base, transform), workers):
                good = [item for item in batch if item.pixels is not None]
                if good:
                    pixels = torch.stack([item.pixels for item in good])
                    for record in records(pixels, [paths[item.index] for item in good]):
                        results.write(record)
                for item in batch:
                    if item.pixels is None:
                        errors.write(error_record(paths[item.index], item.code, item.message))
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
        time.monotonic() - started,
    )  # fmt: skip


def default_workers() -> int:
    """Decoding processes: one per four cores, at most 4. On 2 cores, decoding in the main
    process between batches is fastest (0.74 of the bare model against 0.46 with 2 workers,
    benchmarks/predict_throughput.py): the model's threads need both cores."""
    return min(4, (os.cpu_count() or 1) // 4)


def run_batch_prediction(catalog: Any, args: Any) -> PredictionResult:
    """`python -m trainer predict`: an operation with batchPredictDetails, recorded in MLflow."""
    from trainer.store.resources import Operation, new_id
    from trainer.stored_model import trained_model

    if not 0.0 <= args.score_threshold <= 1.0:
        raise UserError(f"--score-threshold {args.score_threshold} must be within [0, 1]")
    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size} must be at least 1")
    trained = trained_model(catalog, args.id, "prediction")
    input_csv = Path(args.input).expanduser().resolve()
    rows = _read_inputs(trained.config["task"]["name"], input_csv)  # a bad CSV costs nothing
    folder = output_folder(Path(args.output).expanduser().resolve(), trained.model["displayName"])
    details = {
        "inputConfig": {"source": str(input_csv)},
        "outputInfo": {"outputDirectory": str(folder)},
    }
    operation = Operation(new_id(trained.model_id[:3]), None, ("batchPredictDetails", details))
    store = catalog.store
    tags = {"operation": operation.name, "model_id": trained.model_id, "kind": "predict"}
    run_id = store.start_run(f"predict_{trained.model['displayName']}", tags, vars(args))
    store.publish_operation(run_id, operation.resource, "RUNNING")
    print(operation.name, file=sys.stderr, flush=True)
    progress = ProgressLine(operation, lambda: store.publish_operation(
        run_id, operation.resource, "RUNNING"))  # fmt: skip
    try:
        result = _predict(trained, args, rows, input_csv.parent, folder, progress)
    except BaseException as error:
        operation.fail(3 if isinstance(error, UserError) else 13, str(error))
        store.publish_operation(run_id, operation.resource, "FAILED")
        store.end_run(run_id, "FAILED")
        raise
    finally:
        progress.close()
    operation.succeed({})
    store.publish_operation(run_id, operation.resource, "SUCCEEDED")
    store.end_run(run_id)
    return result


def _read_inputs(task: str, input_csv: Path) -> list[Any]:
    if task != "video_classification":
        return read_input_csv(input_csv)
    from trainer.tasks.video_classification.predict import read_prediction_csv

    if not input_csv.is_file():
        raise UserError(f"--input {input_csv}: no such file")
    return read_prediction_csv(input_csv)


def _predict(
    trained: Any, args: Any, rows: list[Any], base: Path, folder: Path,
    progress: Callable[[int, int], None],
) -> PredictionResult:  # fmt: skip
    """The task's own prediction: images to JSONL shards, or videos to JSON files and a CSV."""
    from trainer.stored_model import load_network

    task, cfg, labels = trained.config["task"]["name"], trained.config, trained.labels
    network = load_network(trained)
    if task == "video_classification":
        return _predict_videos(network, cfg, labels, args, rows, base, folder, progress)
    paths = rows
    if task == "object_detection":
        from trainer.tasks.object_detection.images import detection_eval_transform
        from trainer.tasks.object_detection.predict import OUTPUT_PREFIX, check_detection_options

        check_detection_options(args.score_threshold, args.max_bounding_box_count)
        records = detection_records(
            network, labels, args.score_threshold, args.max_bounding_box_count
        )
        transform, prefix = detection_eval_transform(cfg["model"]["input_size"]), OUTPUT_PREFIX
    else:
        records = classification_records(network, labels, args.score_threshold)
        transform, prefix = trained.transform(), RESULTS_PREFIX
    return predict_images(
        records, paths, base, transform, folder, prefix, args.shard_size, args.workers, progress
    )


def _predict_videos(
    network: Any, cfg: dict[str, Any], labels: list[str], args: Any, rows: list[Any],
    base: Path, folder: Path, progress: Callable[[int, int], None],
) -> PredictionResult:  # fmt: skip
    from trainer.tasks.video_classification.predict import PredictOptions, predict_videos
    from trainer.tasks.video_classification.task import clip_spec

    options = PredictOptions(
        segment_classification=args.segment_classification,
        shot_classification=args.shot_classification,
        one_second_interval_classification=args.one_second_interval_classification,
        score_threshold=args.score_threshold,
    )

    def probabilities(clips: Any) -> Any:
        import torch

        with torch.inference_mode():
            return network(clips).float().softmax(dim=1)

    result = predict_videos(
        rows, base, probabilities, labels, clip_spec(cfg),
        folder, options, args.workers, progress,
    )  # fmt: skip
    files = [result.csv_path, *result.json_files]
    return PredictionResult(folder, result.predicted, result.failed, files, [], result.seconds)


class ProgressLine:
    """A live bar on a terminal, a line every few seconds elsewhere; the operation's
    progressPercentage follows along."""

    def __init__(self, operation: Any, publish: Callable[[], None], every: float = 5.0) -> None:
        self.operation, self.publish, self.every = operation, publish, every
        self._last = time.monotonic()
        self._bar: Any = None
        if sys.stderr.isatty():
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("predicting", total=None)

    def __call__(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
        if time.monotonic() - self._last >= self.every or done == total:
            self._last = time.monotonic()
            self.operation.progress(done / total)
            self.publish()
            if self._bar is None:
                log.info("predicted %d of %d images", done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
