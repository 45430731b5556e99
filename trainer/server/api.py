"""The routes of AutoML's v1 REST API (and v1beta1's, for video): models, their evaluations,
operations, datasets, batch prediction and export, each through the functions the CLI verbs
use, on the same store.

Each long-running operation (a training, an import, a batch prediction, an export) runs as a
process of its own: the answer names its Operation at once, and a stopped server loses none of
them (trainer/server/started.py). Request bodies are parsed strictly by Google's own message
types (camelCase or snake_case, unknown fields refused).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from trainer.background import start_in_background, trainer_command
from trainer.errors import FailedPrecondition, NotFound, UserError
from trainer.export_common import QUANTIZATIONS, check_format
from trainer.job.ids import OPERATION_ID_ENV
from trainer.server import trainings
from trainer.server.errors import ApiError, install_error_handlers
from trainer.server.guard import PathRoots
from trainer.server.messages import (
    listed,
    message_types,
    page_arguments,
    parent_name,
    parent_of,
    parsed_body,
)
from trainer.server.started import StartedOperations
from trainer.serving import deployments
from trainer.serving.docker import check_servable
from trainer.settings import Workspace
from trainer.store.automl import Operation, Parent, resource_id
from trainer.store.listing import operation_filter
from trainer.store.resources import new_id
from trainer.tasks import task_configs, task_name_of_model


@dataclass
class Service:
    """What every route shares: the store, the operations started here, where requests may read
    and write, the defaults of every training, and the variables the processes are told."""

    catalog: Any
    workspace: Workspace
    roots: PathRoots
    defaults: list[str]
    runs: Path  # the run directories of the trainings started here
    max_wait_seconds: float = 60.0
    started: StartedOperations = field(init=False)
    _children: list[subprocess.Popen] = field(default_factory=list)
    _writing: threading.Lock = field(default_factory=threading.Lock)
    _http: Any = None

    def __post_init__(self) -> None:
        self.started = StartedOperations(Path(self.workspace.home) / "serve" / "operations")

    @property
    def environment(self) -> dict[str, str]:
        """What each process started here is told: the store this server uses."""
        return {
            "MLFLOW_TRACKING_URI": self.workspace.tracking_uri.reveal(),
            "MLFLOW_EXPERIMENT_NAME": self.workspace.experiment_name,
            "VISION_TRAINER_HOME": self.workspace.home,
        }

    def spawn(self, command: list[str], log: Path, operation_id: str = "") -> subprocess.Popen:
        told = {**os.environ, **self.environment}
        if operation_id:
            told[OPERATION_ID_ENV] = operation_id
        process = start_in_background(command, log, told)
        self._reap()
        self._children.append(process)
        return process

    def http(self) -> Any:
        """The client of the calls to deployed models' servers (one, for its connections)."""
        if self._http is None:
            import httpx

            timeout = deployments.online_defaults()["request_timeout_seconds"] + 5
            self._http = httpx.AsyncClient(timeout=timeout)
        return self._http

    def _reap(self) -> None:
        """Collect the processes that ended (a process nobody waits for stays a zombie)."""
        self._children = [child for child in self._children if child.poll() is None]

    # -- operations ------------------------------------------------------------------------

    def operation(self, operation_id: str) -> dict[str, Any]:
        """The store's record; for one started here and not on record yet, the server's."""
        try:
            return self.catalog.operation(operation_id)
        except NotFound:
            started = self.started.get(resource_id(operation_id))
            if started is None:
                raise
            return started.current()

    def not_yet_recorded(self, parent: Parent) -> list[dict[str, Any]]:
        """The operations started here under ``parent`` that the store does not have, newest
        first (``settle``)."""
        prefix = f"{parent_name(parent)}/"
        waiting = [op for op in self.settle() if op["name"].startswith(prefix)]
        return sorted(waiting, key=lambda op: op["metadata"]["createTime"], reverse=True)

    def settle_forever(self, every: float = 2.0) -> None:
        """``settle`` every few seconds, so that a cancel asked for before a training had put
        its operation on record reaches it though nobody lists (a daemon thread's loop)."""
        while True:
            time.sleep(every)
            with contextlib.suppress(Exception):  # the store busy or down: the next round
                self.settle()

    def settle(self) -> list[dict[str, Any]]:
        """The operations started here that the store does not have: those whose process has
        not recorded them yet, those that ended at once (a model's deletion) and those whose
        process died first. Those the store has are forgotten here, a cancel asked for
        meanwhile passed on."""
        waiting = []
        for started in self.started.all():
            name = started.operation["name"]
            if not started.operation.get("done") and self._recorded(name):
                if started.cancel_requested:
                    with contextlib.suppress(FailedPrecondition):
                        self.catalog.cancel(name)
                self.started.forget(started.operation_id)
                continue
            current = started.current()
            if current["done"] and not started.operation.get("done"):
                if self._recorded(name):  # it recorded itself as it ended
                    continue
                started.operation = current  # died unrecorded: kept as it ended
                self.started.save(started)
            waiting.append(current)
        return waiting

    def _recorded(self, name: str) -> bool:
        try:
            self.catalog.operation(name)
        except NotFound:
            return False
        return True


def done_operation(
    parent: Parent, details: tuple[str, dict[str, Any]], api: str = "v1"
) -> dict[str, Any]:
    """An operation that ended as it began (a deletion): succeeded, its response Empty."""
    operation = Operation(new_id("OP"), None, details, parent, api)
    operation.succeed("", {})
    return operation.resource


def build_router(service: Service) -> APIRouter:  # noqa: C901 - one route per AutoML method
    from trainer.server.dataset_routes import add_dataset_routes

    router = APIRouter()
    base = "/projects/{project}/locations/{location}"
    add_dataset_routes(router, service, base)

    # -- models ----------------------------------------------------------------------------

    @router.get(base + "/models")
    def list_models(project: str, location: str, request: Request) -> dict[str, Any]:
        parent = parent_of(project, location)
        filter_, page_size, token = page_arguments(request)
        pairs, next_token = service.catalog.models_page(
            filter_, page_size, token, parent=parent_name(parent)
        )
        return listed("model", [model for model, _ in pairs], next_token)

    @router.post(base + "/models")
    async def create_model(project: str, location: str, request: Request) -> dict[str, Any]:
        parent = parent_of(project, location)
        model = await parsed_body(request, message_types(request).Model)
        wanted = trainings.training_request(model, parent)
        if wanted.base_model_id:
            _, tags = service.catalog.usable_model(wanted.base_model_id, "training further")
            wanted = trainings.of_base_type(wanted, tags)
        settings = trainings.checked(service.defaults, wanted.overrides)
        operation, pid, log = trainings.start_training(
            settings, [*service.defaults, *wanted.overrides], service.runs, service.environment
        )
        service.started.add(operation, pid, str(log))
        return operation

    @router.get(base + "/models/{model_id}")
    def get_model(project: str, location: str, model_id: str) -> dict[str, Any]:
        return service.catalog.model(parent_of(project, location).name("models", model_id))

    @router.delete(base + "/models/{model_id}")
    def delete_model(project: str, location: str, model_id: str) -> dict[str, Any]:
        parent = parent_of(project, location)
        with service._writing:
            deployments.stop_before_delete(service.catalog, parent.name("models", model_id))
            service.catalog.delete_model(parent.name("models", model_id))
        operation = done_operation(parent, ("deleteDetails", {}))
        service.started.add(operation)
        return operation

    @router.post(base + "/models/{model_id}:export")
    async def export_model(project: str, location: str, model_id: str, request: Request) -> Any:
        parent = parent_of(project, location)
        asked = await parsed_body(request, message_types(request).ExportModelRequest)
        config = asked.output_config
        fmt = config.model_format or "onnx"
        try:
            check_format(fmt)
        except UserError as error:
            raise ApiError("INVALID_ARGUMENT", str(error)) from None
        prefix = config.gcs_destination.output_uri_prefix
        folder = service.roots.writable(prefix, "outputConfig.gcsDestination.outputUriPrefix")
        name = parent.name("models", model_id)
        model, _ = service.catalog.usable_model(name, "export")
        if fmt == "docker":
            check_servable(model)
        # ModelExportOutputConfig's params: here, tflite's "quantize" (none or int8).
        quantize = dict(config.params).get("quantize", "none")
        if quantize not in QUANTIZATIONS or (quantize != "none" and fmt != "tflite"):
            raise ApiError("INVALID_ARGUMENT", f"params.quantize {quantize!r}: none, or int8 "
                           "with modelFormat tflite")  # fmt: skip
        command = trainer_command("models", "export", model_id, "--format", fmt, "--output",
                                  str(folder), "--quantize", quantize)  # fmt: skip
        details = {"outputInfo": {"gcsOutputDirectory": str(folder)}}
        return _start_verb(service, parent, model, command, ("exportModelDetails", details))

    @router.post(base + "/models/{model_id}:batchPredict")
    async def batch_predict(project: str, location: str, model_id: str, request: Request) -> Any:
        parent = parent_of(project, location)
        asked = await parsed_body(request, message_types(request).BatchPredictRequest)
        uris = list(asked.input_config.gcs_source.input_uris)
        if len(uris) != 1:
            raise ApiError("INVALID_ARGUMENT", "inputConfig.gcsSource.inputUris: give one CSV")
        source = service.roots.readable(uris[0], "inputConfig.gcsSource.inputUris")
        prefix = asked.output_config.gcs_destination.output_uri_prefix
        output = service.roots.writable(prefix, "outputConfig.gcsDestination.outputUriPrefix")
        name = parent.name("models", model_id)
        model, _ = service.catalog.usable_model(name, "prediction")
        flags = _predict_flags(dict(asked.params))
        command = trainer_command("predict", model_id, "--input", str(source),
                                  "--output", str(output), *flags)  # fmt: skip
        details = {
            "inputConfig": {"gcsSource": {"inputUris": [str(source)]}},
            "outputInfo": {"gcsOutputDirectory": str(output)},
        }
        return _start_verb(service, parent, model, command, ("batchPredictDetails", details))

    @router.post(base + "/models/{model_id}:deploy")
    async def deploy_model(project: str, location: str, model_id: str, request: Request) -> Any:
        parent = parent_of(project, location)
        asked = await parsed_body(request, message_types(request).DeployModelRequest)
        model, _ = service.catalog.usable_model(parent.name("models", model_id), "deployment")
        deployments.check_online(model)
        node_count = _node_count(asked) or deployments.online_defaults()["node_count"]
        deployments.check_node_count(node_count)
        command = trainer_command("models", "deploy", model_id, "--node-count", str(node_count))
        return _start_verb(service, parent, model, command, ("deployModelDetails", {}))

    @router.post(base + "/models/{model_id}:undeploy")
    async def undeploy_model(project: str, location: str, model_id: str, request: Request) -> Any:
        parent = parent_of(project, location)
        await parsed_body(request, message_types(request).UndeployModelRequest)
        model = service.catalog.model(parent.name("models", model_id))
        if model.get("deploymentState") != deployments.DEPLOYED:
            raise FailedPrecondition(f"model {model_id} is not deployed")
        command = trainer_command("models", "undeploy", model_id)
        return _start_verb(service, parent, model, command, ("undeployModelDetails", {}))

    @router.post(base + "/models/{model_id}:predict")
    async def predict(project: str, location: str, model_id: str, request: Request) -> Response:
        name = parent_of(project, location).name("models", model_id)
        model, _ = service.catalog.usable_model(name, "online prediction")
        deployments.check_online(model)
        if model.get("deploymentState") != deployments.DEPLOYED:
            raise FailedPrecondition(
                f"model {model_id} is not deployed: deploy it first (:deploy, or "
                f"python -m trainer models deploy {model_id})"
            )
        deployment = deployments.running(service.workspace, resource_id(name))
        if deployment is None:
            raise ApiError("UNAVAILABLE", f"model {model_id} is deployed but its server is not "
                           "running yet; try again shortly")  # fmt: skip
        import httpx

        # The model's server answers AutoML's predict itself: the body goes on as it came.
        try:
            answer = await service.http().post(
                deployment.url + request.url.path, content=await request.body(),
                headers={"content-type": "application/json"},
            )  # fmt: skip
        except httpx.TransportError as error:  # it stopped between the check and the call
            raise ApiError("UNAVAILABLE", f"model {model_id}'s server did not answer "
                           f"({type(error).__name__}); try again shortly") from None  # fmt: skip
        return Response(answer.content, answer.status_code, media_type="application/json")

    @router.get(base + "/models/{model_id}/modelEvaluations")
    def list_evaluations(project: str, location: str, model_id: str) -> dict[str, Any]:
        name = parent_of(project, location).name("models", model_id)
        return listed("modelEvaluation", service.catalog.evaluation_resources(name), "")

    @router.get(base + "/models/{model_id}/modelEvaluations/{evaluation_id}")
    def get_evaluation(
        project: str, location: str, model_id: str, evaluation_id: str
    ) -> dict[str, Any]:
        name = parent_of(project, location).name("models", model_id)
        for evaluation in service.catalog.evaluation_resources(name):
            if evaluation["name"] == f"{name}/modelEvaluations/{evaluation_id}":
                return evaluation
        raise NotFound(f"model evaluation {evaluation_id!r} is not one of model {model_id}'s")

    # -- operations ------------------------------------------------------------------------

    @router.get(base + "/operations")
    def list_operations(project: str, location: str, request: Request) -> dict[str, Any]:
        parent = parent_of(project, location)
        filter_, page_size, token = page_arguments(request)
        found, next_token = service.catalog.operations_page(
            filter_, page_size, token, parent=parent_name(parent)
        )
        if not token:  # the newest of all: those the store has not got yet
            found = [*_filtered(service.not_yet_recorded(parent), filter_), *found]
        return listed("operations", found, next_token)

    @router.get(base + "/operations/{operation_id}")
    def get_operation(project: str, location: str, operation_id: str) -> dict[str, Any]:
        return service.operation(parent_of(project, location).name("operations", operation_id))

    @router.post(base + "/operations/{operation_id}:cancel")
    def cancel_operation(project: str, location: str, operation_id: str) -> dict[str, Any]:
        name = parent_of(project, location).name("operations", operation_id)
        started = service.started.get(operation_id)
        try:
            with service._writing:
                service.catalog.cancel(name)
        except NotFound:
            if started is None or started.operation.get("done"):
                raise
            started.cancel_requested = True  # passed on once the training has it on record
            service.started.save(started)
        return {}

    @router.delete(base + "/operations/{operation_id}")
    def delete_operation(project: str, location: str, operation_id: str) -> dict[str, Any]:
        name = parent_of(project, location).name("operations", operation_id)
        operation = service.operation(name)
        if not operation.get("done"):
            raise ApiError("FAILED_PRECONDITION", f"operation {name} is running; cancel it "
                           "first")  # fmt: skip
        service.started.forget(operation_id)
        # One that ended at once (a model's deletion) is the server's alone.
        with contextlib.suppress(NotFound), service._writing:
            service.catalog.delete_operation(name)
        return {}

    @router.post(base + "/operations/{operation_id}:wait")
    async def wait_operation(project: str, location: str, operation_id: str,
                             request: Request) -> dict[str, Any]:  # fmt: skip
        import asyncio

        from google.longrunning import operations_pb2
        from google.protobuf.json_format import Parse, ParseError

        raw = (await request.body()).decode("utf-8", "replace") or "{}"
        try:
            asked = Parse(raw, operations_pb2.WaitOperationRequest())
        except ParseError as error:
            raise ApiError("INVALID_ARGUMENT", f"the request body: {error}") from None
        timeout = asked.timeout.ToTimedelta().total_seconds() if asked.HasField("timeout") else 0
        limit = min(timeout or service.max_wait_seconds, service.max_wait_seconds)
        name = parent_of(project, location).name("operations", operation_id)
        deadline = time.monotonic() + limit
        while True:
            operation = service.operation(name)
            if operation.get("done") or time.monotonic() >= deadline:
                return operation
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    return router


def _filtered(operations: list[dict[str, Any]], filter_: str) -> list[dict[str, Any]]:
    """The started operations a list's filter keeps, as the store's are kept (none of them has
    run tags yet: a ``worksOn`` term keeps none)."""
    keep = operation_filter(filter_)
    return [operation for operation in operations if keep(operation, {})]


def _node_count(asked: Any) -> int:
    """The nodeCount of a DeployModelRequest's model deployment metadata (0: not given)."""
    for descriptor, value in type(asked).pb(asked).ListFields():
        if descriptor.name.endswith("_model_deployment_metadata"):
            return int(value.node_count)
    return 0


def _predict_flags(params: dict[str, str]) -> list[str]:
    """AutoML's batch prediction ``params`` as the predict verb's flags."""
    flags = []
    for key, value in params.items():
        if key != "score_threshold":
            raise ApiError("INVALID_ARGUMENT", f"params {key!r}: only score_threshold is taken")
        flags += ["--score-threshold", value]
    return flags


def _start_verb(
    service: Service,
    parent: Parent,
    model: dict[str, Any],
    command: list[str],
    details: tuple[str, dict[str, Any]],
) -> dict[str, Any]:
    """A verb on a model (predict, export) as a process of its own, its operation named here."""
    api = task_configs()[task_name_of_model(model)]["automl_api"]
    operation_id = new_id(resource_id(model["name"])[:3])
    operation = Operation(operation_id, None, details, parent, api).resource
    log = Path(service.workspace.home) / "serve" / "logs" / f"{operation_id}.log"
    process = service.spawn(command, log, operation_id)
    service.started.add(operation, process.pid, str(log))
    return operation


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="vision-trainer: AutoML's API", docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    install_error_handlers(app)
    router = build_router(service)
    app.include_router(router, prefix="/v1")
    app.include_router(router, prefix="/v1beta1")  # AutoML Video's

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app
