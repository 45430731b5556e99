"""Models and operations as the management CLI sees them, read from the store.

Everything comes from MLflow (the registry and the runs' tags), so the verbs work from any
machine that shares the tracking server. Nothing here imports torch or Lightning, and reads do
not import MLflow either (see store_reader.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from trainer.errors import FailedPrecondition, NotFound, UserError
from trainer.store.automl import Parent, bare_id, details_of, resource_id
from trainer.store.listing import (
    decode_token,
    encode_token,
    model_filter,
    operation_filter,
    page,
    page_limit,
)
from trainer.store.reader import (
    MODEL_TAG,
    OPERATION_TAG,
    RegisteredModel,
    RunRecord,
    local_artifact_root,
    open_reader,
)
from trainer.store.resources import downloads, expired_on, parse_time, utc_now

FINISHED_STATES = ("SUCCEEDED", "FAILED", "CANCELLED", "INTERRUPTED")
# A RUNNING operation that has not put its cost on record for this long is taken as dead
# (killed without a chance to say so): it no longer blocks deleting its models.
STALE_AFTER = timedelta(minutes=5)
# An operation whose result is no longer wanted (DeleteOperation): neither listed nor found.
DELETED_TAG = "operation_deleted"
# The times of a registered model that the verbs read back: the Model's own, then its tags.
TIME_TAGS = ("create_time", "expire_time")
log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.reader = open_reader(tracking_uri, experiment)

    @cached_property
    def store(self) -> Any:
        from trainer.store.store import Store  # MLflow itself: only for the verbs that write

        return Store(self.tracking_uri, self.experiment)

    @property
    def client(self) -> Any:
        return self.store.client

    # -- models ----------------------------------------------------------------------------

    def models(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """Every Model resource with its details (figures and expiry time), newest first. One
        with a bad time is listed all the same, last, and the bad field reported: a list is
        where a user finds such an entry to delete it, and failing it would hide every other
        model. The verbs that use a model refuse it instead (``usable_model``)."""
        return self.models_page(page_size=None)[0]

    def models_page(
        self,
        filter: str = "",
        page_size: int | None = 0,
        page_token: str = "",
        task_keys: Mapping[str, str] | None = None,
        parent: str = "",
    ) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], str]:
        """AutoML's ListModels: one page of the Models ``filter`` keeps (listing.model_filter),
        each with its details as ``models`` gives them, newest first, and the next page's token
        ("" after the last page). ``page_size`` 0 is DEFAULT_PAGE_SIZE, at most MAX_PAGE_SIZE;
        None is every one (the CLI's --all). ``task_keys`` (task name to metadata key, as
        trainer.tasks.task_metadata_keys gives it) adds the ``task=`` term; ``parent``
        (``projects/P/locations/L``) keeps the models under it alone. A bad filter, size or
        token is a ListRequestError (a UserError) naming which."""
        keep = model_filter(filter, task_keys)
        limit = page_limit(page_size)
        after = decode_token(page_token, "models", filter, parent)

        def accept(entry: RegisteredModel) -> tuple[dict, dict, dict] | None:
            model = entry.resource()
            if model is None or not _under(model["name"], parent):  # another project's entry
                return None
            details = details_of(model, entry.tags)
            return (model, details, entry.tags) if keep(model, details) else None

        found, last = page(self.reader.model_listing(), accept, limit, after)
        for model, _, tags in found:  # the page's own: what is shown is what is reported
            _report_bad_times(model, tags)
        token = encode_token("models", filter, last, parent) if last else ""
        return [(model, details) for model, details, _ in found], token

    def model(self, model_id: str) -> dict[str, Any]:
        return self.model_and_tags(model_id)[0]

    def model_and_tags(self, model_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The Model resource and its registry tags, read once, a bad time in them reported
        (as `models list` does: the record is shown as it is, to be mended or deleted)."""
        model, tags = self._lookup(model_id)
        _report_bad_times(model, tags)
        return model, tags

    def _lookup(self, model_id: str) -> tuple[dict[str, Any], dict[str, str]]:
        """A full name must be the model's own: the same ID under another project or location
        is another model; an entry of that name that is not this project's is not a model."""
        wanted = model_id
        found = self.reader.registered_model(bare_id(model_id, "models"))
        if found is None:
            raise NotFound(f"model {wanted!r} is not in {self.tracking_uri}")
        model = found.resource()
        if model is None:
            raise NotFound(
                f"model {wanted!r} is not in this project: {self.tracking_uri} has a registered "
                f"model of that name, but it is another project's (no {MODEL_TAG} tag of ours)"
            )
        if wanted.startswith("projects/") and wanted != model["name"]:
            raise NotFound(f"model {wanted!r} is not in {self.tracking_uri}")
        return model, found.tags

    def usable_model(self, model_id: str, purpose: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The Model and tags of a model that has not expired. The verbs that load a network
        ask this first, before importing torch: a wrong or expired ID is refused at once, and
        so is a bad expiry time (one line naming the model and the tag): using the model
        would mean guessing whether it has expired."""
        model, tags = self._lookup(model_id)
        expire = expired_on(tags, f"model {resource_id(model['name'])}")
        if expire:
            raise FailedPrecondition(
                f"model {resource_id(model['name'])} expired on {expire}; it can be listed and "
                f"deleted, not used for {purpose}"
            )
        return model, tags

    def delete_model(self, model_id: str) -> str:
        model_id = resource_id(self.model(model_id)["name"])
        runs = self.reader.runs()
        for run in _active(runs):
            if model_id in (run.tags.get("model_id"), run.tags.get("base_model_id")):
                raise FailedPrecondition(
                    f"model {model_id} is in use by the running operation "
                    f"{run.tags.get('operation')}; cancel it first"
                )
        root = local_artifact_root(self.tracking_uri)
        for run in (r for r in runs if r.tags.get("model_id") == model_id):  # evaluations too
            # Run tags and artifact URIs are values from the store: only what is provably this
            # model's is removed (its artifacts under the store's own folder, the checkpoints of
            # a run directory whose state names the model).
            _remove_local(run.artifact_uri, root)
            run_dir = Path(run.tags.get("run_dir") or "/nonexistent")
            if _run_dir_of(run_dir, model_id):
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
                (run_dir / "start.ckpt").unlink(missing_ok=True)
            self.client.delete_run(run.run_id)
        self.client.delete_registered_model(model_id)
        return model_id

    def evaluations(self, model_id: str) -> list[dict[str, Any]]:
        """The summaries of a model's evaluations, newest first (from run tags only)."""
        model_id = resource_id(self.model(model_id)["name"])
        found = [
            json.loads(run.tags["evaluation_summary"])
            for run in self._runs_of_model(model_id)
            if "evaluation_summary" in run.tags
        ]
        return sorted(found, key=lambda summary: summary["createTime"], reverse=True)

    def evaluation_resources(self, model_id: str) -> list[dict[str, Any]]:
        """Every ModelEvaluation resource of a model (overall and per label), newest first."""
        model_id = resource_id(self.model(model_id)["name"])
        resources: list[dict[str, Any]] = []
        for run in self._runs_of_model(model_id):
            if "evaluation_summary" in run.tags:
                name = json.loads(run.tags["evaluation_summary"])["name"]
                resources += self._evaluation_file(run, name.rsplit("/", 1)[1])
        return sorted(resources, key=lambda r: r["createTime"], reverse=True)

    def _runs_of_model(self, model_id: str) -> list[RunRecord]:
        return [run for run in self.reader.runs() if run.tags.get("model_id") == model_id]

    def _evaluation_file(self, run: RunRecord, evaluation_id: str) -> list[dict[str, Any]]:
        relative = f"evaluations/{evaluation_id}/evaluation.json"
        parsed = urlparse(run.artifact_uri)
        if parsed.scheme in ("", "file"):  # a local store: read the file, no MLflow import
            return json.loads((Path(unquote(parsed.path)) / relative).read_text())
        from trainer.settings import Workspace

        folder = downloads(Workspace.current().home, run.tags.get("model_id", ""))
        fetched = self.client.download_artifacts(run.run_id, relative, str(folder))
        return json.loads(Path(fetched).read_text())

    # -- operations ------------------------------------------------------------------------

    def operations(self) -> list[dict[str, Any]]:
        """Every Operation resource of the experiment, newest first."""
        return self.operations_page(page_size=None)[0]

    def operations_page(
        self, filter: str = "", page_size: int | None = 0, page_token: str = "", parent: str = ""
    ) -> tuple[list[dict[str, Any]], str]:
        """AutoML's ListOperations: one page of the Operations ``filter`` keeps
        (listing.operation_filter), newest first, and the next page's token ("" after the last
        page); ``page_size``, ``parent`` and errors as ``models_page``'s."""
        keep = operation_filter(filter)
        limit = page_limit(page_size)
        after = decode_token(page_token, "operations", filter, parent)

        def accept(run: RunRecord) -> dict[str, Any] | None:
            if run.tags.get(DELETED_TAG) == "true":
                return None
            operation = _operation_of(run)
            if operation is None or not _under(str(operation.get("name", "")), parent):
                return None
            return operation if keep(operation, run.tags) else None

        found, last = page(self.reader.operation_listing(), accept, limit, after)
        return found, encode_token("operations", filter, last, parent) if last else ""

    def operation(self, operation_id: str) -> dict[str, Any]:
        return json.loads(self._run_of(operation_id).tags["operation_json"])

    def operations_working_on(self, model_id: str) -> set[str]:
        model_id = bare_id(model_id, "models")
        runs = self.reader.runs()
        return {
            resource_id(r.tags.get("operation", ""))
            for r in runs
            if r.tags.get("model_id") == model_id
        }

    def cancel(self, operation_id: str) -> str:
        run = self._run_of(operation_id)
        state, name = run.tags.get("state", ""), run.tags["operation"]
        if state in FINISHED_STATES:
            raise FailedPrecondition(
                f"operation {name} has already ended ({state}); nothing to cancel"
            )
        self.client.set_tag(run.run_id, "cancel_request_time", utc_now())
        self.client.set_tag(run.run_id, "cancel_requested", "true")
        return name

    def delete_operation(self, operation_id: str) -> str:
        """AutoML's DeleteOperation: the operation's result is no longer wanted, so it is no
        longer listed or found; what it made (a model, a dataset) stays. A running one is
        FailedPrecondition: cancel it first."""
        run = self._run_of(operation_id)
        state, name = run.tags.get("state", ""), run.tags["operation"]
        if state not in FINISHED_STATES:
            raise FailedPrecondition(f"operation {name} is {state or 'running'}; cancel it first")
        self.client.set_tag(run.run_id, DELETED_TAG, "true")
        return name

    def _run_of(self, operation_id: str) -> RunRecord:
        """The run of an operation given by ID or name (full, or ``operations/ID``)."""
        wanted = bare_id(operation_id, "operations")
        # A full name must be the run's own: one query finds it (an API server's polls), where
        # a bare ID is looked for among every run.
        full = operation_id.startswith("projects/")
        runs = self.reader.runs_tagged("operation", operation_id) if full else self.reader.runs()
        for run in runs:
            name = run.tags.get("operation", "")
            full_name_differs = operation_id.startswith("projects/") and operation_id != name
            if (
                resource_id(name) == wanted
                and "operation_json" in run.tags
                and run.tags.get(DELETED_TAG) != "true"
                and not full_name_differs
            ):
                return run
        raise NotFound(f"operation {operation_id!r} is not in {self.tracking_uri}")


def _active(runs: list[RunRecord]) -> list[RunRecord]:
    now = datetime.now(timezone.utc)
    return [
        run
        for run in runs
        if run.tags.get("state") == "RUNNING" and now - _updated(run) < STALE_AFTER
    ]


def _updated(run: RunRecord) -> datetime:
    what = f"operation {run.tags.get('operation', run.run_id)}'s update_time tag"
    return parse_time(run.tags.get("update_time", "1970-01-01T00:00:00Z"), what)


def _bad_times(model: dict[str, Any], tags: dict[str, str]) -> list[str]:
    """What is wrong with a stored model's times, one message each."""
    model_id = resource_id(model["name"])
    fields = [("createTime", model.get("createTime"), "field")]
    fields += [(key, tags[key], "tag") for key in TIME_TAGS if tags.get(key)]
    problems: list[str] = []
    for key, value, kind in fields:
        try:
            parse_time(str(value), f"model {model_id}'s {key} {kind}")
        except UserError as error:
            problems.append(str(error))
    return problems


def _report_bad_times(model: dict[str, Any], tags: dict[str, str]) -> None:
    # On stderr (logging's last resort where the verb set up no logging): stdout stays the
    # table or JSON that scripts read.
    for problem in _bad_times(model, tags):
        log.warning("warning: %s", problem)


def _under(name: str, parent: str) -> bool:
    """Whether a resource is under ``parent`` (``projects/P/locations/L``; "": any). Names
    written before they were full ones (``models/ID``) are the default parent's."""
    found = Parent.of_name(name)
    return not parent or parent == f"projects/{found.project}/locations/{found.location}"


def _operation_of(run: RunRecord) -> dict[str, Any] | None:
    """The Operation a run holds; None (and a warning) for a tag that is not one, which
    would fail the table of every other operation."""
    try:
        operation = json.loads(run.tags[OPERATION_TAG])
    except ValueError:
        operation = None
    if isinstance(operation, dict) and isinstance(operation.get("metadata"), dict):
        return operation
    log.warning("warning: run %s's %s tag is not an Operation; not listed", run.run_id,
                OPERATION_TAG)  # fmt: skip
    return None


def _remove_local(artifact_uri: str, root: Path | None) -> None:
    """Remove a run's artifacts when they are local files under the store's artifact folder;
    a server removes its own, and a path elsewhere is not ours to delete."""
    parsed = urlparse(artifact_uri)
    if root is None or parsed.scheme not in ("", "file"):
        return
    path = Path(unquote(parsed.path)).resolve()
    if path != root and path.is_relative_to(root):
        shutil.rmtree(path, ignore_errors=True)


def _run_dir_of(run_dir: Path, model_id: str) -> bool:
    """Whether ``run_dir`` is the run directory of ``model_id`` (its state.json says so)."""
    try:
        return json.loads((run_dir / "state.json").read_text()).get("model_id") == model_id
    except (OSError, ValueError, AttributeError):
        return False
