"""Batch prediction, as AutoML runs it: `python -m trainer predict ID --input CSV --output DIR`.

An operation with ``batchPredictDetails``, recorded in MLflow like a training. The model's task
reads the input file and writes AutoML's files into
``DIR/prediction-<display name>-<UTC timestamp>/``; a malformed input or flag is refused before
the operation starts, so it costs nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer.data.prediction import PredictionResult
from trainer.data.prediction_inputs import (
    SourcePolicy,
    check_row_count,
    check_workers,
    prediction_limits,
)
from trainer.errors import UserError
from trainer.store.automl import RpcCode
from trainer.store.lifecycle import OperationRun, operation_on_record
from trainer.stored_model import load_network, trained_model
from trainer.tasks import PredictRequest, task_of

log = logging.getLogger("trainer")


def output_folder(output: Path, display_name: str) -> Path:
    """AutoML's name: ``prediction-<display name>-<timestamp of the call, ISO 8601 UTC>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    folder = output / f"prediction-{display_name}-{stamp}"
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def run_batch_prediction(catalog: Any, args: Any) -> PredictionResult:
    """`python -m trainer predict`: an operation with batchPredictDetails, recorded in MLflow."""
    if not 0.0 <= args.score_threshold <= 1.0:
        raise UserError(f"--score-threshold {args.score_threshold} must be within [0, 1]")
    if args.shard_size < 1:
        raise UserError(f"--shard-size {args.shard_size} must be at least 1")
    limits = prediction_limits()
    check_workers(args.workers, limits)
    trained = trained_model(catalog, args.id, "prediction")
    task = task_of(trained.settings)
    input_csv = Path(args.input).expanduser().resolve()
    if not input_csv.is_file():
        raise UserError(f"--input {input_csv}: no such file")
    check_row_count(input_csv, limits)  # before the reader holds the whole file
    rows = task.read_prediction_input(input_csv, args)  # a bad CSV or flag costs nothing
    # Remote rows only where asked for, each read bounded in time (conf/predict.yaml).
    sources = SourcePolicy(limits.remote_timeout_seconds if args.allow_remote else None)
    folder = output_folder(Path(args.output).expanduser().resolve(), trained.model["displayName"])
    details = {  # AutoML's field names; the files are local here
        "inputConfig": {"gcsSource": {"inputUris": [str(input_csv)]}},
        "outputInfo": {"gcsOutputDirectory": str(folder)},
    }
    operation = trained.new_operation(("batchPredictDetails", details))
    tags = {"model_id": trained.model_id, "kind": "predict"}
    name = f"predict_{trained.model['displayName']}"
    with operation_on_record(catalog.store, name, tags, vars(args), operation) as run:
        print(operation.name, file=sys.stderr, flush=True)
        progress = ProgressLine(run)
        request = PredictRequest(rows, input_csv.parent, folder, args, progress, sources)
        try:
            result = task.predict(load_network(trained), trained.settings, trained.labels, request)
        finally:
            progress.close()
        operation.partial_failures(partial_failures(result))
        operation.succeed("BatchPredictResult", {"metadata": result.response_metadata})
    return result


def partial_failures(result: PredictionResult) -> list[dict[str, Any]]:
    """AutoML's ``partialFailures``: the first failed inputs, and a last record that counts the
    rest, which only the output files list (there can be millions)."""
    failures = list(result.partial_failures)
    more = result.failed - len(failures)
    if more > 0:
        files = ", ".join(path.name for path in result.error_files or result.result_files[:1])
        failures.append({"code": int(RpcCode.UNKNOWN), "message": f"{more} more: see {files}"})
    return failures


class ProgressLine:
    """A live bar on a terminal, a line every few seconds elsewhere; the operation's
    progressPercent follows along."""

    def __init__(self, run: OperationRun, every: float = 5.0) -> None:
        self.operation, self.publish, self.every = run.operation, run.publish, every
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
                log.info("predicted %d of %d inputs", done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
