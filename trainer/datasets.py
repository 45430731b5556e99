"""Datasets as AutoML's API has them: create, importData, list, get, delete, their annotation
specs and label stats. The CLI's ``datasets`` verbs (dataset_verbs.py) and the API server call
these same functions, on the same store; trainer/store/datasets.py says where each thing lives.

Every function takes the ``Workspace`` (home, tracking URI, experiment) and a dataset as its ID
or full name. Errors are one-line UserErrors: ``NotFound`` for a dataset that is not on record,
``FailedPrecondition`` for one whose state refuses the request (an import still running on it),
any other ``UserError`` for a bad argument (INVALID_ARGUMENT).

An import is an Operation (AutoML's ``importData``): ``begin_import`` records it and starts its
work in a process of its own (`python -m trainer datasets import ID URI... --operation OP`), so a
stopped caller (a server restarted) loses nothing; ``import_data`` does the same work in this
process and returns the ended operation. Nothing here imports torch, nor MLflow for reads.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

from trainer import CONF_DIR
from trainer.data.dataset_rows import (
    DatasetFormat,
    ImportRow,
    RowFailure,
    check_rows,
    merge,
    read_sources,
    write_rows,
)
from trainer.data.label_stats import label_stats as count_labels
from trainer.data.manifest import CheckStopped
from trainer.errors import FailedPrecondition, NotFound, UserError
from trainer.settings import Workspace
from trainer.store.automl import Operation, Parent, RpcCode, resource_id
from trainer.store.datasets import (
    DELETE,
    FILES,
    IMPORT,
    NAME_TAG,
    ROWS,
    STATS,
    DatasetRecord,
    DatasetStore,
    annotation_spec,
    dataset_resource,
)
from trainer.store.lifecycle import Ending, OperationRun, failed, record_end
from trainer.store.resources import check_name, new_id, utc_now, write_json_atomic
from trainer.tasks import dataset_format, task_configs

# AutoML v1's CreateDataset is a long-running operation; v1beta1's (AutoML Video) answers with
# the Dataset itself, and its OperationMetadata has no createDatasetDetails.
CREATE_IS_AN_OPERATION = ("v1",)
MAX_DESCRIPTION = 1000  # characters: the Dataset is a run tag, which MLflow caps at 8,000
# The operation lists this many failed rows (AutoML's partialFailures), then one that counts the
# rest, which import_errors.csv of the import's run lists (prediction does the same).
MAX_PARTIAL_FAILURES = 20
CHECK_WORKERS = 8  # threads checking files: decoding releases the GIL
PUBLISH_EVERY = 2.0  # seconds between two progress writes to the store
NO_ROWS = "the dataset has no rows yet: import some (python -m trainer datasets import ID FILE)"


class Created(NamedTuple):
    """What ``create_dataset`` made: the Dataset, and its ended create operation (None for a
    v1beta1 dataset, whose CreateDataset is no operation)."""

    dataset: dict[str, Any]
    operation: dict[str, Any] | None


def default_parent() -> Parent:
    """``automl.project`` and ``automl.location`` of conf/config.yaml, as a training reads them."""
    from omegaconf import OmegaConf

    automl = OmegaConf.load(CONF_DIR / "config.yaml").automl
    return Parent(str(automl.project), str(automl.location))


# -- create, get, list, delete ------------------------------------------------------------------


def create_dataset(
    workspace: Workspace,
    display_name: str,
    task: str,
    classification_type: str | None = None,
    description: str = "",
    parent: Parent | None = None,
) -> Created:
    """A new, empty dataset of ``task`` (one of conf/task/), its ID the task's prefix and 19
    digits as AutoML's. ``classification_type``: image classification's MULTICLASS (the default:
    one label an image) or MULTILABEL (any number, none included), what its imports take and
    its trainings read the rows as; other tasks take none. Raises UserError for an unknown task,
    a bad display name or classification type, a description over 1,000 characters."""
    configs = task_configs()
    if task not in configs:
        raise UserError(f"task {task!r} is not a task; use one of {', '.join(configs)}")
    check_name("displayName", display_name)
    if len(description) > MAX_DESCRIPTION:
        raise UserError(f"the description has {len(description)} characters; at most "
                        f"{MAX_DESCRIPTION} are kept")  # fmt: skip
    found = dataset_format(task)
    metadata = {found.metadata_key: found.metadata(classification_type)}
    config, where = configs[task], parent or default_parent()
    name = where.name("datasets", new_id(config["id_prefix"]))
    dataset = dataset_resource(name, display_name, metadata, description)
    api, operation = config["automl_api"], None
    if api in CREATE_IS_AN_OPERATION:  # ended at once: kept on the dataset's own run
        created = Operation(new_id(config["id_prefix"]), None, ("createDatasetDetails", {}),
                            where, api)  # fmt: skip
        created.succeed("Dataset", dataset)
        operation = created.resource
    DatasetStore(workspace).create(dataset, task, api, operation)
    return Created(dataset, operation)


def get_dataset(workspace: Workspace, dataset: str) -> dict[str, Any]:
    """The Dataset resource. Raises NotFound."""
    return DatasetStore(workspace).record(dataset).resource


def list_datasets(workspace: Workspace) -> list[dict[str, Any]]:
    """Every Dataset of the store's experiment, newest first (AutoML's ListDatasetsResponse
    holds them as ``datasets``)."""
    return [record.resource for record in DatasetStore(workspace).records()]


def delete_dataset(workspace: Workspace, dataset: str) -> dict[str, Any]:
    """Delete a dataset and its rows (models trained from it keep theirs): AutoML's
    DeleteDataset, an Operation that ends at once, put on record. Raises NotFound, and
    FailedPrecondition while an import runs on it."""
    datasets = DatasetStore(workspace)
    record = datasets.record(dataset)
    running = datasets.running_import(record)
    if running:
        raise FailedPrecondition(
            f"dataset {record.dataset_id} has an import running ({running}); wait for it to "
            "end or cancel it first"
        )
    operation = _new_operation(record, "deleteDetails")
    datasets.delete(record)
    operation.succeed("", {})
    run_id = _start_run(datasets, record, DELETE, operation, {})
    OperationRun(datasets.store, run_id, operation).publish("SUCCEEDED")
    datasets.store.end_run(run_id)
    return operation.resource


# -- annotation specs and label stats ---------------------------------------------------------


def label_stats(workspace: Workspace, dataset: str) -> dict[str, Any]:
    """The dataset's label stats and AutoML's advice, as its last import recorded them (the
    ``label_stats.json`` of its current version; trainer/data/label_stats.py):

    ``{"dataset": NAME, "updateTime": ..., "unit": "image", "exampleCount": N,
    "splits": {"TRAIN": n, "VALIDATION": n, "TEST": n, "UNASSIGNED": n},
    "labels": [{"annotationSpec": NAME, "displayName": L, "exampleCount": n,
    "splits": {...}, "boxes": n (detection only)}],
    "advice": [{"code": C, "labels": [...], "message": M}], "adequate": bool,
    "refused": {C: {label: n}}}``

    Raises NotFound."""
    datasets = DatasetStore(workspace)
    record = datasets.record(dataset)
    stats = datasets.version_json(record, STATS)
    if stats is None:  # nothing imported yet
        unit = dataset_format(record.task).unit
        stats = _named(record, count_labels([], {}, unit, NO_ROWS, {}))
    return stats


def list_annotation_specs(workspace: Workspace, dataset: str) -> list[dict[str, Any]]:
    """The dataset's AnnotationSpecs (one per label, with its ``exampleCount``), by label.
    Raises NotFound."""
    stats = label_stats(workspace, dataset)
    return [
        annotation_spec(stats["dataset"], label["displayName"], label["exampleCount"])
        for label in stats["labels"]
    ]


def get_annotation_spec(workspace: Workspace, name: str) -> dict[str, Any]:
    """One AnnotationSpec by its full name (``.../datasets/ID/annotationSpecs/SPEC``). Raises
    NotFound."""
    dataset, _, _ = name.partition("/annotationSpecs/")
    for spec in list_annotation_specs(workspace, dataset):
        if spec["name"] == name:
            return spec
    raise NotFound(f"annotation spec {name!r} is not in dataset {dataset!r}")


def _named(record: DatasetRecord, stats: dict[str, Any]) -> dict[str, Any]:
    """Stats with the dataset's name, the time, and each label's AnnotationSpec name."""
    for label in stats["labels"]:
        spec = annotation_spec(record.name, label["displayName"], label["exampleCount"])
        label["annotationSpec"] = spec["name"]
    return {"dataset": record.name, "updateTime": utc_now(), **stats}


# -- importData --------------------------------------------------------------------------------


def local_sources(input_uris: list[str]) -> list[Path]:
    """``inputConfig.gcsSource.inputUris`` as local paths: a path, or a ``file://`` URI; each
    must exist. Raises UserError otherwise."""
    if not input_uris:
        raise UserError("give at least one input: a CSV file (or a folder, for images)")
    sources = []
    for uri in input_uris:
        parsed = urlparse(uri)
        if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
            path = Path(unquote(parsed.path))
        elif parsed.scheme:
            raise UserError(f"input {uri[:200]!r}: only local paths and file:// URIs are read "
                            "here")  # fmt: skip
        else:
            path = Path(uri).expanduser()
        if not path.exists():
            raise UserError(f"input {uri[:200]!r} does not exist")
        sources.append(Path(os.path.abspath(path)))
    return sources


def begin_import(workspace: Workspace, dataset: str, input_uris: list[str]) -> dict[str, Any]:
    """AutoML's importData, started: the Operation (not done) at once, recorded, while a process
    of its own reads, checks and appends the rows (its log: ``<home>/imports/<OP>.log``).
    Raises NotFound, FailedPrecondition while another import runs on the dataset, UserError for
    an input that is no local path or does not exist."""
    from trainer.background import start_in_background, trainer_command

    datasets, record, sources = _checked(workspace, dataset, input_uris)
    run = _open_import(datasets, record, sources)
    assert run.operation is not None
    operation_id = resource_id(run.operation.name)
    command = trainer_command("datasets", "import", record.dataset_id,
                              *map(str, sources), "--operation", operation_id)  # fmt: skip
    told = {**os.environ, "MLFLOW_TRACKING_URI": datasets.tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": workspace.experiment_name,
            "VISION_TRAINER_HOME": workspace.home}  # fmt: skip
    try:
        start_in_background(command, import_log(workspace, operation_id), told)
    except OSError as error:
        record_end(run, failed(error))
        raise
    return run.operation.resource


def import_log(workspace: Workspace, operation_id: str) -> Path:
    return Path(workspace.home).expanduser() / "imports" / f"{operation_id}.log"


def import_data(
    workspace: Workspace,
    dataset: str,
    input_uris: list[str],
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict[str, Any]:
    """AutoML's importData in this process: the ended Operation (its ``error`` when no row
    could be imported, or it was cancelled; its ``partialFailures`` for the rows that failed).
    Raises what ``begin_import`` raises before the operation starts."""
    datasets, record, sources = _checked(workspace, dataset, input_uris)
    run = _open_import(datasets, record, sources)
    return _import(datasets, record, run, sources, progress)


def run_import(
    workspace: Workspace, dataset: str, input_uris: list[str], operation_id: str
) -> dict[str, Any]:
    """The work of an import ``begin_import`` recorded: what its background process runs."""
    datasets = DatasetStore(workspace)
    record = datasets.record(dataset)
    name = Parent.of_name(record.name).name("operations", operation_id)
    runs = [run for run in datasets.reader.runs_tagged("operation", name)
            if run.tags.get("kind") == IMPORT]  # fmt: skip
    if not runs:
        raise NotFound(f"operation {operation_id!r} is no import on record")
    resource = json.loads(runs[0].tags["operation_json"])
    if resource.get("done"):
        raise FailedPrecondition(f"operation {operation_id} has already ended")
    run = OperationRun(datasets.store, runs[0].run_id, Operation.of_resource(resource, record.api))
    return _import(datasets, record, run, local_sources(input_uris), lambda done, total: None)


def _checked(
    workspace: Workspace, dataset: str, input_uris: list[str]
) -> tuple[DatasetStore, DatasetRecord, list[Path]]:
    datasets = DatasetStore(workspace)
    record = datasets.record(dataset)
    sources = local_sources(input_uris)
    running = datasets.running_import(record)
    if running:
        raise FailedPrecondition(
            f"dataset {record.dataset_id} has an import running ({running}); one at a time"
        )
    return datasets, record, sources


def _new_operation(record: DatasetRecord, details: str) -> Operation:
    prefix = task_configs()[record.task]["id_prefix"]
    return Operation(new_id(prefix), None, (details, {}), Parent.of_name(record.name), record.api)


def _start_run(
    datasets: DatasetStore, record: DatasetRecord, kind: str, operation: Operation,
    params: dict[str, Any],
) -> str:  # fmt: skip
    tags = {"operation": operation.name, "kind": kind, NAME_TAG: record.name}
    run_name = f"{kind}_{record.resource['displayName']}"
    return str(datasets.store.start_run(run_name, tags, params))


def _open_import(
    datasets: DatasetStore, record: DatasetRecord, sources: list[Path]
) -> OperationRun:
    operation = _new_operation(record, "importDataDetails")
    params = {"dataset": record.name, "inputUris": [str(source) for source in sources]}
    run = OperationRun(datasets.store, _start_run(datasets, record, IMPORT, operation, params),
                       operation)  # fmt: skip
    run.publish("RUNNING")
    return run


def _import(
    datasets: DatasetStore,
    record: DatasetRecord,
    run: OperationRun,
    sources: list[Path],
    progress: Callable[[int, int], None],
) -> dict[str, Any]:
    """Read, check and append; the operation ended on record whatever happens."""
    assert run.operation is not None
    operation, store = run.operation, datasets.store
    found = dataset_format(record.task)
    publisher = _Publisher(run, progress)
    try:
        rows, failures = read_sources(found, sources, _metadata(record, found))
        kept, facts, bad_files = check_rows(
            found, rows, CHECK_WORKERS, lambda: store.cancel_requested(run.run_id), publisher
        )
        failures += bad_files
        added, failures = _append(datasets, record, operation, found, kept, facts, failures)
    except CheckStopped as stop:
        record_end(run, Ending("CANCELLED", RpcCode.CANCELLED,
                               f"cancelled: {stop}; nothing was imported"))  # fmt: skip
        return operation.resource
    except BaseException as error:
        record_end(run, failed(error))
        raise
    _report_failures(run, failures)
    if added == 0 and failures:
        record_end(run, Ending("FAILED", RpcCode.INVALID_ARGUMENT,
                               f"no row was imported: {len(failures)} failed (partialFailures "
                               "names them)"))  # fmt: skip
    elif added == 0 and not rows:
        record_end(run, Ending("FAILED", RpcCode.INVALID_ARGUMENT, "the inputs hold no rows"))
    else:
        operation.succeed("", {})
        run.publish("SUCCEEDED")
        store.end_run(run.run_id)
    return operation.resource


def _append(
    datasets: DatasetStore,
    record: DatasetRecord,
    operation: Operation,
    found: DatasetFormat,
    kept: list[ImportRow],
    facts: dict[str, dict[str, Any]],
    failures: list[RowFailure],
) -> tuple[int, list[RowFailure]]:
    """Merge the checked rows into the dataset's current ones (read now: the latest version)
    and commit a new version when any was added; how many were, and every failure."""
    current = datasets.record(record.dataset_id)  # NotFound: deleted meanwhile
    held_file = datasets.version_file(current, ROWS)
    metadata = _metadata(current, found)
    held, _ = read_sources(found, [held_file], metadata) if held_file else ([], [])
    merged, added, conflicts = merge(held, kept)
    failures = failures + conflicts
    if added == 0:
        return 0, failures
    all_facts = {**(datasets.version_json(current, FILES) or {}), **facts}
    earlier = datasets.version_json(current, STATS) or {}
    refused = _refused(earlier.get("refused", {}), failures)
    with tempfile.TemporaryDirectory(prefix="dataset-import-") as folder:
        rows_csv = Path(folder) / ROWS
        write_rows(merged, rows_csv)
        trainable = found.trainable(rows_csv, metadata)
        stats = count_labels(merged, all_facts, found.unit, trainable, refused)
        stats = _named(current, stats)
        write_json_atomic(Path(folder) / FILES, all_facts, indent=None)
        write_json_atomic(Path(folder) / STATS, stats)
        dataset = {**current.resource, "exampleCount": stats["exampleCount"]}
        datasets.commit(current, resource_id(operation.name), Path(folder), dataset)
    return added, failures


def _metadata(record: DatasetRecord, found: DatasetFormat) -> dict[str, Any]:
    """The value of the Dataset's metadata field: how its rows read (a classificationType)."""
    return dict(record.resource.get(found.metadata_key) or {})


def _refused(earlier: dict[str, dict[str, int]], failures: list[RowFailure]) -> dict:
    """Per advice, by label, the rows refused that the advice counts (small boxes), this import's
    added to the earlier ones'."""
    counts = {advice: Counter(labels) for advice, labels in earlier.items()}
    for failure in failures:
        if failure.advice:
            counts.setdefault(failure.advice, Counter()).update(failure.labels)
    return {advice: dict(sorted(labels.items())) for advice, labels in counts.items()}


def _report_failures(run: OperationRun, failures: list[RowFailure]) -> None:
    """The first failures in ``partialFailures`` and a last one counting the rest; every one
    in the import run's ``import_errors.csv``. None: the field is left out, as AutoML's JSON
    leaves out an empty list."""
    assert run.operation is not None
    if not failures:
        return
    statuses = [failure.status() for failure in failures[:MAX_PARTIAL_FAILURES]]
    more = len(failures) - len(statuses)
    if more > 0:
        message = f"{more} more: see import_errors.csv of the import's run"
        statuses.append({"code": int(RpcCode.UNKNOWN), "message": message})
        with tempfile.TemporaryDirectory(prefix="import-errors-") as folder:
            path = Path(folder) / "import_errors.csv"
            _write_failures(failures, path)
            run.store.log_files(run.run_id, [path])
    run.operation.partial_failures(statuses)


def _write_failures(failures: list[RowFailure], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["where", "code", "problem", "row"])
        writer.writerows([f.where, RpcCode(f.code).name, f.problem, f.text] for f in failures)


class _Publisher:
    """The checking's progress: to the caller at each chunk, to the store's operation (its
    progressPercent and updateTime) every few seconds."""

    def __init__(self, run: OperationRun, progress: Callable[[int, int], None]) -> None:
        self.run, self.progress, self.last = run, progress, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        self.progress(done, total)
        if time.monotonic() - self.last >= PUBLISH_EVERY and self.run.operation is not None:
            self.last = time.monotonic()
            self.run.operation.progress(0.95 * done / max(total, 1))  # the rest: the merge
            self.run.publish("RUNNING")
