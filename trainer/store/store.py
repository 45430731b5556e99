"""MLflow as the system of record: one run per operation, the model in the registry."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from trainer.store.automl import FIGURES, resource_id
from trainer.store.reader import MODEL_TAG, StoreReader, local_artifact_root, open_reader
from trainer.store.resources import SPENT_SECONDS, check_id, open_lock

# Listing requirements explicitly saves MLflow ~8 s of inferring them on every log_model call.
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1"]


@contextmanager
def _no_requirement_scan() -> Iterator[None]:
    """MLflow checks a logged model's requirements against the installed packages by mapping
    every installed distribution's files to its modules: 1.5 s on 2 cores, once per process, so
    every training paid it inside its budget. PIP_REQUIREMENTS are the pins pyproject.toml
    installs, so the check cannot find a mismatch here; MLflow has no setting to skip it."""
    import mlflow.utils.environment as environment

    check = environment.warn_dependency_requirement_mismatches
    environment.warn_dependency_requirement_mismatches = lambda model_requirements: None
    try:
        yield
    finally:
        environment.warn_dependency_requirement_mismatches = check


def metadata_tags(model: dict[str, Any], details: dict[str, Any]) -> dict[str, str]:
    """The Model and its details (model_details.json) flattened into tags, for the registry and
    the run: every figure of the model is a tag, whatever its AutoML message has fields for."""
    tags = {
        "model_id": resource_id(model["name"]),
        "model_name": model["name"],
        "display_name": model["displayName"],
        "dataset_id": model["datasetId"],
        "create_time": model["createTime"],
        "expire_time": details["expireTime"],
    }
    tags.update({key: str(details[key]) for key in FIGURES})
    return tags


def model_summary(tags: dict[str, str]) -> str:
    """A registered model's description: what MLflow's UI shows first, in Markdown. The Model
    resource itself is the ``model_json`` tag, where the verbs read it."""
    model_id = tags["model_id"]
    lines = [
        f"**`{tags['display_name']}`**, trained by vision-trainer under a budget",
        "",
        f"- task: {tags.get('task')}, model type: `{tags.get('modelType')}`",
        f"- budget: {tags.get('trainBudgetMilliNodeHours')} milli-node-hours, "
        f"cost: {tags.get('trainCostMilliNodeHours')}, stopped: {tags.get('stopReason')}",
        f"- created: {_when(tags['create_time'])}, expires: {_when(tags['expire_time'])}",
        f"- model: `{tags['model_name']}`",
    ]
    if tags.get("operation"):
        lines.append(f"- operation: `{tags['operation']}`")
    if tags.get("baseModelId"):
        lines.append(f"- trained further from: `{tags['baseModelId']}`")
    lines += [
        "",
        f"The AutoML Model resource is the `{MODEL_TAG}` tag: "
        f"`python -m trainer models get {model_id} --json`.",
    ]
    return "\n".join(lines)


def _when(timestamp: str) -> str:
    return f"{timestamp[:19].replace('T', ' ')} UTC" if timestamp else "never"


def _artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a local SQLite store go to ``mlartifacts/`` beside the database.

    MLflow's default is ``./mlruns``, and a ``./mlruns`` folder makes a later `mlflow ui` in the
    same folder switch to the deprecated file store and show nothing (DESIGN.md).
    """
    root = local_artifact_root(tracking_uri)
    return root.as_uri() if root else None  # a tracking server decides where artifacts go


@contextmanager
def _store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise opening a local SQLite store across processes.

    Two trainings that open a new ``mlflow.db`` at the same moment both run MLflow's schema
    migrations and one of them fails; they also race to create the experiment.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    lock = open_lock(Path(f"{database}.lock"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)  # releases the lock


class Store:
    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        # MLflow 3 silently switches to the deprecated file store when ./mlruns exists unless
        # the URI is set explicitly (DESIGN.md): always set it, for the client and the fluent API.
        mlflow.set_tracking_uri(tracking_uri)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        # stdout carries the Model JSON alone; MLflow would print run URLs there.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        with _store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)  # migrates a new database
            experiment = self.client.get_experiment_by_name(experiment_name)
            self.experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(
                    experiment_name, artifact_location=_artifact_location(tracking_uri)
                )
            )
            self.client.search_registered_models(max_results=1)  # the registry's tables too

    @cached_property
    def reader(self) -> StoreReader:
        return open_reader(self.tracking_uri, self.experiment_name)

    def start_run(self, run_name: str, tags: dict[str, str], config: dict[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        self.log_config(run_id, config)
        return run_id

    def log_config(self, run_id: str, config: dict[str, Any]) -> None:
        """The training's config as the run's ``config.json`` (again when a value is settled
        once the data is read: ``model.input_size=auto``)."""
        self.client.log_dict(run_id, config, "config.json")

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        # One batch is one store write; a tag at a time was one write each, every flush.
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_files(self, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
        for file in files:
            if file.is_file():
                self.client.log_artifact(run_id, str(file), artifact_path)

    def log_network(self, run_id: str, network: Any, input_example: Any) -> Any:
        """Log a torch.export program (pt2) in MLflow's pytorch flavour, which MLflow loads
        without unpickling anything (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false) and `mlflow
        models serve` serves; return its ModelInfo."""
        import mlflow.pytorch  # imported here: the flavour pulls in more than the store needs

        with mlflow.start_run(run_id=run_id), _no_requirement_scan():
            return mlflow.pytorch.log_model(
                network,
                name="model",
                input_example=input_example,
                pip_requirements=PIP_REQUIREMENTS,
                serialization_format="pt2",
                # MLflow would load the saved model back and predict the example: 2.4 s of the
                # 6 s a MobileNetV3-Small recording took on 2 cores, paid by every training.
                # tests/test_training_e2e.py loads a logged model and predicts with it instead.
                validate_serving_input=False,
            )

    def log_code_model(
        self, run_id: str, code: Path, artifacts: dict[str, Path], input_example: Any
    ) -> Any:
        """Log a pyfunc as code (MLflow's "models from code"): loading it runs ``code`` with
        its ``artifacts``, and unpickles nothing; `mlflow models serve` serves it."""
        import mlflow.pyfunc

        with mlflow.start_run(run_id=run_id), _no_requirement_scan():
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={key: str(path) for key, path in artifacts.items()},
                input_example=input_example,
                pip_requirements=PIP_REQUIREMENTS,
            )

    def register(
        self,
        run_id: str,
        logged: Any,
        model: dict[str, Any],
        details: dict[str, Any],
        extra_tags: dict[str, str],
    ) -> None:
        """Register the logged network under the model's ID, its figures as tags.

        A resumed operation killed after registering, before it could say so, registers again:
        its own earlier entry (the same run) is replaced; anyone else's is left alone.
        """
        tags = {**metadata_tags(model, details), **extra_tags}
        model_id = tags["model_id"]
        earlier = self.registered_tags(model_id)
        if earlier is not None:
            if earlier.get("run_id") != run_id:
                raise RuntimeError(f"model ID {model_id} is registered by another run")
            self.client.delete_registered_model(model_id)
        self.client.create_registered_model(
            model_id,
            tags={**tags, MODEL_TAG: json.dumps(model)},
            description=model_summary(tags),
        )
        self.client.create_model_version(
            model_id,
            logged.model_uri,
            run_id=run_id,
            tags=tags,
            await_creation_for=0,
            model_id=logged.model_id,  # a tracking server checks the source against it
        )
        self.set_tags(run_id, tags)

    def update_model(
        self, model_id: str, model: dict[str, Any], figures: dict[str, str] | None = None
    ) -> None:
        """Put a changed Model resource on record (its deployment state), and the registry
        tags of the figures that changed with it."""
        for key, value in {**(figures or {}), MODEL_TAG: json.dumps(model)}.items():
            self.client.set_registered_model_tag(model_id, key, value)

    def registered_tags(self, model_id: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            return dict(self.client.get_registered_model(model_id).tags)
        except MlflowException:
            return None

    def run_of_operation(self, operation_id: str) -> Any | None:
        """The run of an operation, whatever form its name has (``operations/ID`` before the
        names were AutoML's full ones). ``operation_id`` is checked: it becomes part of a query."""
        check_id(operation_id, "operation ID")
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.operation LIKE '%operations/{operation_id}'"
        )
        return runs[0] if runs else None

    def reopen_run(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def download(self, run_id: str, artifact_path: str, destination: Path) -> Path | None:
        from mlflow.exceptions import MlflowException

        destination.mkdir(parents=True, exist_ok=True)
        try:
            return Path(self.client.download_artifacts(run_id, artifact_path, str(destination)))
        except (MlflowException, OSError):
            return None

    def publish_operation(
        self,
        run_id: str,
        operation: dict[str, Any],
        state: str,
        spent_seconds: float | None = None,
    ) -> None:
        """Mirror the Operation resource into the run, for readers on other machines; a
        training's seconds spent so far too, the cost the store has on record for it."""
        tags = {
            "operation_json": json.dumps(operation),
            "state": state,
            "update_time": operation["metadata"]["updateTime"],
        }
        if spent_seconds is not None:
            tags[SPENT_SECONDS] = repr(float(spent_seconds))
        self.set_tags(run_id, tags)

    def cancel_requested(self, run_id: str) -> bool:
        # Polled every few seconds while training: one tag, not the whole run with its metrics.
        return self.reader.run_tag(run_id, "cancel_requested") == "true"

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
