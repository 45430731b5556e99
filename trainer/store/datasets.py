"""Datasets on record: AutoML's Dataset and AnnotationSpec resources in the MLflow store.

A dataset is one MLflow run of the experiment that holds the models and operations, tagged
``kind=dataset``; its Dataset resource is the ``dataset_json`` tag, so listing datasets reads
tags only (one query, no MLflow import). Each import that adds rows writes a new version of the
dataset's files as the run's artifacts under ``versions/<import operation ID>/``:

- ``rows.csv``: every row the dataset holds, in its task's CSV form (``ML_USE,path,...``) with
  absolute paths: what a training with ``dataset_id=`` reads (a copy of it, under the home);
- ``files.json``: what checking each file found (an image's size, a video's duration);
- ``label_stats.json``: the label stats and advice, with the AnnotationSpecs.

The ``dataset_version`` tag names the current version; it is written last, together with the
updated Dataset, so an import stopped halfway leaves the dataset as it was. An import is an
operation of its own (a run tagged ``kind=import`` with ``operation_json``, as every operation),
and so is a deletion (``kind=delete_dataset``). Knows no task: a dataset's task is a tag.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

from trainer.errors import FailedPrecondition, NotFound, UserError
from trainer.settings import Workspace
from trainer.store.automl import bare_id, resource_id
from trainer.store.reader import RunRecord, local_artifact_root, open_reader
from trainer.store.resources import check_id, downloads, parse_time, utc_now

DATASET, IMPORT, DELETE = "dataset", "import", "delete_dataset"  # the runs' ``kind`` tags
DATASET_TAG, VERSION_TAG, NAME_TAG = "dataset_json", "dataset_version", "dataset_name"
ROWS, FILES, STATS = "rows.csv", "files.json", "label_stats.json"
# An import that has not published for this long is taken as dead (killed without a chance to
# say so): it no longer blocks another import or the dataset's deletion (catalog.py's rule).
STALE_AFTER = timedelta(minutes=5)


def dataset_resource(
    name: str, display_name: str, metadata: dict[str, Any], description: str = ""
) -> dict[str, Any]:
    """A new, empty Dataset: ``metadata`` is its task's metadata field and value, e.g.
    ``{"imageObjectDetectionDatasetMetadata": {}}``."""
    dataset = {
        "name": name,
        "displayName": display_name,
        "description": description,
        "exampleCount": 0,
        "createTime": utc_now(),
        **metadata,
    }
    return with_etag(dataset, "")


def with_etag(dataset: dict[str, Any], version: str) -> dict[str, Any]:
    """The Dataset with its ``etag``: a digest of its fields and rows version, which changes
    whenever either does (AutoML's optimistic-concurrency token)."""
    body = {key: value for key, value in dataset.items() if key != "etag"}
    digest = hashlib.sha256(json.dumps([body, version], sort_keys=True).encode()).hexdigest()
    return {**body, "etag": digest[:16]}


def annotation_spec(dataset_name: str, label: str, example_count: int) -> dict[str, Any]:
    """AutoML's AnnotationSpec of one label: its ID is digits, the same for the label in every
    version of the dataset."""
    digest = hashlib.sha256(f"{dataset_name}\0{label}".encode()).hexdigest()
    spec_id = str(int(digest[:15], 16))
    return {
        "name": f"{dataset_name}/annotationSpecs/{spec_id}",
        "displayName": label,
        "exampleCount": example_count,
    }


@dataclass(frozen=True)
class DatasetRecord:
    """A dataset's run and its Dataset resource."""

    run: RunRecord
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.resource["name"])

    @property
    def dataset_id(self) -> str:
        return resource_id(self.name)

    @property
    def task(self) -> str:
        return self.run.tags.get("task", "")

    @property
    def api(self) -> str:
        return self.run.tags.get("automl_api", "v1")

    @property
    def classification_type(self) -> str | None:
        """The classificationType of the Dataset's metadata (image classification's MULTICLASS
        or MULTILABEL); None for a dataset whose metadata has none."""
        for value in self.resource.values():
            if isinstance(value, dict) and value.get("classificationType"):
                return str(value["classificationType"])
        return None

    @property
    def version(self) -> str:
        """The artifact folder of the current rows (``versions/<ID>``); empty before any import."""
        return self.run.tags.get(VERSION_TAG, "")


class DatasetStore:
    """The datasets of one store and experiment: reads from tags and local files (no MLflow
    import), writes through MLflow's client."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.tracking_uri = workspace.tracking_uri.reveal()
        self.reader = open_reader(self.tracking_uri, workspace.experiment_name)

    @cached_property
    def store(self) -> Any:
        from trainer.store.store import Store  # MLflow itself: only for writes

        return Store(self.tracking_uri, self.workspace.experiment_name)

    # -- reads ------------------------------------------------------------------------------

    def records(self) -> list[DatasetRecord]:
        """Every dataset, newest first."""
        found = [_record(run) for run in self.reader.runs_tagged("kind", DATASET)]
        kept = [record for record in found if record is not None]
        return sorted(kept, key=lambda record: record.resource["createTime"], reverse=True)

    def record(self, dataset: str) -> DatasetRecord:
        """A dataset by ID or name (a full name must be its own: the same ID under another
        project or location is another dataset)."""
        wanted = bare_id(dataset, "datasets")
        for record in self.records():
            if record.dataset_id == wanted and (
                not dataset.startswith("projects/") or dataset == record.name
            ):
                return record
        raise NotFound(f"dataset {dataset!r} is not in {self.workspace.tracking_uri} "
                       "(python -m trainer datasets list shows those there)")  # fmt: skip

    def runs_of(self, record: DatasetRecord, kind: str) -> list[RunRecord]:
        """The dataset's operation runs of ``kind`` (imports, deletion)."""
        runs = self.reader.runs_tagged(NAME_TAG, record.name)
        return [run for run in runs if run.tags.get("kind") == kind]

    def running_import(self, record: DatasetRecord) -> str | None:
        """The name of an import still running on the dataset, if any (a dead one goes stale)."""
        now = datetime.now(timezone.utc)
        for run in self.runs_of(record, IMPORT):
            if run.tags.get("state") == "RUNNING" and now - _updated(run) < STALE_AFTER:
                return run.tags.get("operation", "")
        return None

    def version_file(self, record: DatasetRecord, file_name: str, version: str = "") -> Path | None:
        """A file of the dataset's current version (or of an earlier ``versions/ID``): the
        artifact itself in a local store, a download under the home from a tracking server;
        None before the first import."""
        version = version or record.version
        if not version:
            return None
        relative = f"{version}/{file_name}"
        parsed = urlparse(record.run.artifact_uri)
        if parsed.scheme in ("", "file"):
            path = Path(unquote(parsed.path)) / relative
            return path if path.is_file() else None
        folder = downloads(self.workspace.home, record.dataset_id) / version
        return self.store.download(record.run.run_id, relative, folder)

    def version_json(self, record: DatasetRecord, file_name: str) -> Any:
        path = self.version_file(record, file_name)
        return json.loads(path.read_text()) if path is not None else None

    # -- writes -----------------------------------------------------------------------------

    def create(
        self, dataset: dict[str, Any], task: str, api: str, operation: dict[str, Any] | None
    ) -> str:
        """Put a new Dataset on record, with its ended create ``operation`` if it has one (on
        the same run, where operations are listed from); its run ID."""
        run_tags = {
            "kind": DATASET,
            NAME_TAG: dataset["name"],
            DATASET_TAG: json.dumps(dataset),
            "task": task,
            "automl_api": api,
        }
        if operation is not None:
            run_tags["operation"] = operation["name"]
            run_tags["operation_json"] = json.dumps(operation)
            run_tags["state"] = "SUCCEEDED"
            run_tags["update_time"] = operation["metadata"]["updateTime"]
        client = self.store.client
        run = client.create_run(
            self.store.experiment_id, run_name=f"dataset_{dataset['displayName']}", tags=run_tags
        )
        # A record, not work under way: MLflow's UI would show it running forever.
        client.set_terminated(run.info.run_id)
        return str(run.info.run_id)

    def commit(
        self, record: DatasetRecord, version: str, folder: Path, dataset: dict[str, Any]
    ) -> None:
        """Log ``folder``'s files as version ``versions/<version>``, then make it the current
        one with the updated Dataset (one tag write: readers see the old or the new)."""
        artifact_path = f"versions/{check_id(version, 'version')}"
        self.store.log_files(record.run.run_id, sorted(folder.iterdir()), artifact_path)
        tags = {DATASET_TAG: json.dumps(with_etag(dataset, artifact_path)),
                VERSION_TAG: artifact_path}  # fmt: skip
        self.store.set_tags(record.run.run_id, tags)

    def delete(self, record: DatasetRecord) -> None:
        """The dataset's run, and its files where they are local under the store's folder (a
        tracking server removes its own)."""
        self.store.client.delete_run(record.run.run_id)
        parsed = urlparse(record.run.artifact_uri)
        root = local_artifact_root(self.tracking_uri)
        if root is not None and parsed.scheme in ("", "file"):
            path = Path(unquote(parsed.path)).resolve()
            if path != root and path.is_relative_to(root):  # only what is provably the store's
                shutil.rmtree(path, ignore_errors=True)


def _record(run: RunRecord) -> DatasetRecord | None:
    """A dataset run's record; None for one whose Dataset is unreadable (edited by hand)."""
    try:
        dataset = json.loads(run.tags.get(DATASET_TAG, ""))
    except ValueError:
        return None
    fields = ("name", "displayName", "createTime")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in fields):
        return None
    return DatasetRecord(run, dataset)


def _updated(run: RunRecord) -> datetime:
    what = f"operation {run.tags.get('operation', run.run_id)}'s update_time tag"
    return parse_time(run.tags.get("update_time", "1970-01-01T00:00:00Z"), what)


# -- a training's rows -----------------------------------------------------------------------


class TrainingRows(NamedTuple):
    """What a training with ``dataset_id=`` reads: the dataset's bare ID, its pinned rows, and
    its classificationType (None for a task without one, or where the rows pinned already are
    read again: a resumed training keeps the type it settled)."""

    dataset_id: str
    path: Path
    classification_type: str | None = None


def rows_for_training(
    workspace: Workspace, dataset: str, task: str, given_path: str | None
) -> TrainingRows:
    """The dataset's ID and the rows a training with ``dataset_id=`` reads: a copy of its
    current ``rows.csv`` under the home, named by its version, so that a resumed training
    reads what it began with, whatever was imported since (or if the dataset was deleted);
    and how to read them (its classificationType). Refused in one line: a ``dataset.path`` as
    well, an unknown dataset, one of another task, one with no rows."""
    dataset_id = bare_id(dataset, "datasets")
    pinned = Path(workspace.home).expanduser() / "dataset_rows" / check_id(dataset_id, "dataset_id")
    if given_path is not None:
        path = Path(given_path).expanduser()
        if path.parent != pinned:
            raise UserError(
                f"dataset_id={dataset!r} and dataset.path={given_path!r} are both given; "
                "give one of them"
            )
        if not path.is_file():  # a resume on another machine: the same version, again
            version = check_id(path.stem, "the rows' version")
            _pin(DatasetStore(workspace), dataset, f"versions/{version}", path)
        return TrainingRows(dataset_id, path)
    datasets = DatasetStore(workspace)
    record = datasets.record(dataset)
    if record.task != task:
        raise UserError(
            f"dataset {dataset_id} is a dataset of task {record.task}; train it with "
            f"task={record.task}"
        )
    if not record.version:
        raise FailedPrecondition(
            f"dataset {dataset_id} has no imported rows; import some first: "
            f"python -m trainer datasets import {dataset_id} FILE"
        )
    target = pinned / f"{resource_id(record.version)}.csv"
    if not target.is_file():
        _pin(datasets, dataset, record.version, target)
    return TrainingRows(dataset_id, target, record.classification_type)


def _pin(datasets: DatasetStore, dataset: str, version: str, target: Path) -> None:
    """Copy version ``version`` of the dataset's rows to ``target``."""
    source = datasets.version_file(datasets.record(dataset), ROWS, version)
    if source is None:
        raise NotFound(f"dataset {dataset!r} has no rows of version {version!r} any more")
    _copy_atomic(source, target)


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy beside ``target`` and rename: two trainings starting at once never read half."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with open(handle, "wb") as out, source.open("rb") as data:
            shutil.copyfileobj(data, out)
        Path(temp).replace(target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
