"""Deployments on this machine: a model server per deployed model, and its state on record.

A deployment is a process of its own (``python -m trainer.serving``, in its own session, so it
outlives the verb or the API server that started it, as a deployed AutoML model outlives the
call that deployed it) on a free port of 127.0.0.1. Its folder,
``<home>/serve/deployments/<model ID>/``, holds the serving package, the server's log and
``deployment.json`` (pid, start time, port, node count). The Model on record says
``deploymentState`` and its metadata's ``nodeCount``; ``restore`` starts again every model the
store says is deployed whose server is gone (the API server calls it as it starts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.background import start_in_background
from trainer.errors import FailedPrecondition, UserError
from trainer.settings import Workspace
from trainer.store.automl import metadata_of, resource_id
from trainer.store.resources import utc_now, write_json_atomic
from trainer.sweep.liveness import process_alive, start_ticks

DEPLOYED, UNDEPLOYED = "DEPLOYED", "UNDEPLOYED"
RECORD_FILE = "deployment.json"
NOT_ONLINE = (
    "model {id} predicts in batch only, as AutoML served its task: use batch prediction "
    "(python -m trainer predict, or the API's batchPredict)"
)


def online_defaults() -> dict[str, Any]:
    from trainer.server.defaults import serve_defaults

    return serve_defaults()["online"]


@dataclass
class Deployment:
    model_id: str
    folder: Path
    pid: int
    started: int | None  # the process's start time in clock ticks: a reused pid is not it
    port: int
    node_count: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return process_alive(self.pid, self.started)


def deployments_folder(workspace: Workspace) -> Path:
    return Path(workspace.home) / "serve" / "deployments"


def running(workspace: Workspace, model_id: str) -> Deployment | None:
    """The model's server on this machine, if it runs."""
    path = deployments_folder(workspace) / model_id / RECORD_FILE
    try:
        found = json.loads(path.read_text())
        deployment = Deployment(model_id, path.parent, int(found["pid"]), found.get("started"),
                                int(found["port"]), int(found["nodeCount"]))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return deployment if deployment.alive() else None


def check_node_count(node_count: int) -> None:
    most = online_defaults()["max_node_count"]
    if not 1 <= node_count <= most:
        raise UserError(f"nodeCount {node_count}: give 1 to {most} (conf/serve.yaml's "
                        "online.max_node_count)")  # fmt: skip


def check_online(model: dict[str, Any]) -> None:
    """A model of a task AutoML served in batch only is refused (400) in one line."""
    from trainer.tasks import task_configs, task_name_of_model

    if not task_configs()[task_name_of_model(model)]["online_prediction"]:
        raise UserError(NOT_ONLINE.format(id=resource_id(model["name"])))


def deploy_on_record(catalog: Any, model_id: str, node_count: int) -> Deployment:
    """`models deploy`: ``deploy`` as an operation on record (deployModelDetails)."""
    from trainer.store.lifecycle import operation_on_record
    from trainer.stored_model import trained_model

    check_node_count(node_count)
    trained = trained_model(catalog, model_id, "deployment")
    check_online(trained.model)
    operation = trained.new_operation(("deployModelDetails", {}))
    tags = {"model_id": trained.model_id, "kind": "deploy"}
    params = {"id": trained.model_id, "node_count": node_count}
    name = f"deploy_{trained.model['displayName']}"
    with operation_on_record(catalog.store, name, tags, params, operation):
        print(operation.name, file=sys.stderr, flush=True)
        deployment = deploy(catalog, Workspace.current(), trained, node_count)
        operation.succeed("", {})  # DeployModel's response is google.protobuf.Empty
    return deployment


def deploy(catalog: Any, workspace: Workspace, trained: Any, node_count: int) -> Deployment:
    """Start the model's server (again, with ``node_count`` workers, when one runs), wait until
    it answers /health, and put DEPLOYED on record."""
    from trainer.serving.package import write_package

    stop(workspace, trained.model_id)
    folder = deployments_folder(workspace) / trained.model_id
    write_package(trained, folder / "package")
    deployment = start(folder, trained.model_id, node_count)
    record_state(catalog, trained.model_id, DEPLOYED, node_count)
    return deployment


def undeploy_on_record(catalog: Any, model_id: str) -> str:
    """`models undeploy`: stop the model's server (its requests in flight finish) and put
    UNDEPLOYED on record, as an operation (undeployModelDetails)."""
    from trainer.store.lifecycle import operation_on_record
    from trainer.stored_model import model_operation
    from trainer.tasks import task_configs, task_name_of_model

    workspace = Workspace.current()
    model = catalog.model(model_id)
    model_id = resource_id(model["name"])
    if model.get("deploymentState") != DEPLOYED and running(workspace, model_id) is None:
        raise FailedPrecondition(f"model {model_id} is not deployed")
    api = task_configs()[task_name_of_model(model)]["automl_api"]
    operation = model_operation(model, api, ("undeployModelDetails", {}))
    tags = {"model_id": model_id, "kind": "undeploy"}
    name = f"undeploy_{model['displayName']}"
    with operation_on_record(catalog.store, name, tags, {"id": model_id}, operation):
        print(operation.name, file=sys.stderr, flush=True)
        stop(workspace, model_id)
        record_state(catalog, model_id, UNDEPLOYED, 0)
        operation.succeed("", {})
    return model_id


def stop_before_delete(catalog: Any, model_id: str) -> None:
    """`models delete` of a deployed model: its server is stopped first (on this machine)."""
    model = catalog.model(model_id)
    model_id = resource_id(model["name"])
    stop(Workspace.current(), model_id)
    if model.get("deploymentState") == DEPLOYED:
        record_state(catalog, model_id, UNDEPLOYED, 0)


def start(folder: Path, model_id: str, node_count: int) -> Deployment:
    """The server of the package in ``folder``, started and answering /health."""
    port = free_port()
    command = [sys.executable, "-m", "trainer.serving", str(folder / "package"),
               "--port", str(port), "--workers", str(node_count)]  # fmt: skip
    process = start_in_background(command, folder / "server.log", os.environ)
    deployment = Deployment(model_id, folder, process.pid, start_ticks(process.pid), port,
                            node_count)  # fmt: skip
    write_json_atomic(folder / RECORD_FILE, {
        "pid": deployment.pid, "started": deployment.started, "port": port,
        "nodeCount": node_count, "startTime": utc_now(),
    })  # fmt: skip
    deadline = time.monotonic() + float(online_defaults()["ready_timeout_seconds"])
    while not healthy(deployment.url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(deployment)
            tail = _log_tail(folder / "server.log")
            raise UserError(f"model {model_id}'s server did not start: {tail}")
        time.sleep(0.25)
    return deployment


def stop(workspace: Workspace, model_id: str) -> None:
    found = running(workspace, model_id)
    if found is not None:
        stop_process(found)


def stop_process(deployment: Deployment, wait: float = 60.0) -> None:
    """SIGTERM (the server drains), SIGKILL to its session if it has not ended in ``wait``."""
    try:
        os.kill(deployment.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait
    while deployment.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if deployment.alive():
        os.killpg(deployment.pid, signal.SIGKILL)  # its session: the workers too


def restore(catalog: Any, workspace: Workspace) -> list[str]:
    """Start the server of every model on record as DEPLOYED whose server is gone (a restart of
    the machine or of the API server); the IDs started."""
    restarted = []
    for model, _ in catalog.models():
        model_id = resource_id(model["name"])
        folder = deployments_folder(workspace) / model_id
        if model.get("deploymentState") != DEPLOYED or running(workspace, model_id):
            continue
        node_count = int(metadata_of(model).get("nodeCount") or 1)
        if not (folder / "package").is_dir():  # deployed from another machine's home
            from trainer.serving.package import write_package
            from trainer.stored_model import trained_model

            write_package(trained_model(catalog, model_id, "deployment"), folder / "package")
        start(folder, model_id, node_count)
        restarted.append(model_id)
    return restarted


def record_state(catalog: Any, model_id: str, state: str, node_count: int) -> None:
    """The Model on record with its deploymentState and (image tasks) nodeCount."""
    model = catalog.model(model_id)
    model["deploymentState"] = state
    model["updateTime"] = utc_now()
    metadata = metadata_of(model)
    if "nodeCount" in metadata:
        metadata["nodeCount"] = str(node_count)
    catalog.store.update_model(model_id, model, {"nodeCount": str(node_count)})


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def free_port() -> int:
    # LitServe binds the port itself and takes no port 0: a free one is picked here.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _log_tail(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1][:300] if lines else "no output"
