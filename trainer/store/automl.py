"""AutoML's resources as Google's own client types parse them: names, Model and Operation.

Every resource here parses strictly (unknown fields refused) into the message types of
`google-cloud-automl`: v1 for images, v1beta1 for video, which has no v1 model. What AutoML has
no field for (a model's expiry time, the figures a task's metadata message lacks) goes into
``model_details.json`` beside ``model.json`` and into the registry's tags, never into a Model.
tests/test_automl_conformance.py parses real outputs with those types.

Names are AutoML's full names, ``projects/{project}/locations/{location}/models/{id}``, with
the project and location from conf/config.yaml (``automl.*``, ``local`` by default); every
verb also takes the bare ID, and resources written with the older ``models/{id}`` still read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.settings import TaskSettings
from trainer.store.resources import utc_now, write_json_atomic


class RpcCode(IntEnum):
    """google.rpc.Code: an operation's ``error.code``, a failed input's ``partialFailures``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def named(cls, name: str) -> RpcCode:
        """The code of a status written as ``NOT_FOUND: ...`` (AutoML Video's CSV); UNKNOWN for
        a name that is none."""
        return cls.__members__.get(name, cls.UNKNOWN)


TYPE_URL = "type.googleapis.com/google.cloud.automl.{api}.{message}"
EMPTY = "type.googleapis.com/google.protobuf.Empty"  # ExportModel's response
SEGMENT = r"[A-Za-z0-9_-]{1,63}"  # a project or location: what GCP allows, no slashes
# Our figures of a model, as model_metadata() names them; each task's AutoML metadata message
# has the ones its conf/task/<task>.yaml lists in automl_metadata_fields.
FIGURES = (
    "baseModelId",
    "modelType",
    "trainBudgetMilliNodeHours",
    "trainCostMilliNodeHours",
    "stopReason",
    "nodeQps",
    "nodeCount",
)


@dataclass(frozen=True)
class Parent:
    """Where resources live: ``projects/{project}/locations/{location}``."""

    project: str = "local"
    location: str = "local"

    def __post_init__(self) -> None:
        for key, value in (("automl.project", self.project), ("automl.location", self.location)):
            if not re.fullmatch(SEGMENT, str(value)):
                raise UserError(f"{key}={value!r} is invalid: use 1 to 63 letters, digits, - or _")

    @classmethod
    def of_name(cls, name: str) -> Parent:
        """The parent of a resource's name; a bare ``models/{id}`` of older records: local."""
        found = re.match(rf"projects/({SEGMENT})/locations/({SEGMENT})/", name)
        return cls(*found.groups()) if found else cls()

    def name(self, collection: str, resource_id: str) -> str:
        return f"projects/{self.project}/locations/{self.location}/{collection}/{resource_id}"


def resource_id(name: str) -> str:
    """The ID at the end of a resource name (full, ``models/ID`` or bare)."""
    return name.rsplit("/", 1)[-1]


def bare_id(text: str, collection: str) -> str:
    """The ID a user or a record gives, in any of AutoML's forms: ``ID``, ``{collection}/ID`` or
    ``projects/P/locations/L/{collection}/ID``; anything else comes back as it is, to be refused
    by whoever looks it up."""
    found = re.fullmatch(rf"(?:projects/{SEGMENT}/locations/{SEGMENT}/)?(?:{collection}/)?([^/]+)",
                         text)  # fmt: skip
    return found.group(1) if found else text


def is_resource_name(text: str, collection: str) -> bool:
    return bool(re.fullmatch(rf"(?:projects/{SEGMENT}/locations/{SEGMENT}/)?{collection}/[^/]+",
                             text))  # fmt: skip


def field_name(json_name: str) -> str:
    """A message field's proto name from its JSON name (``trainBudgetMilliNodeHours`` is
    ``train_budget_milli_node_hours``): how a oneof names the field that is set."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", json_name).lower()


def type_url(api: str, message: str) -> str:
    """The ``@type`` of an AutoML message packed in a ``google.protobuf.Any``."""
    return TYPE_URL.format(api=api, message=message)


def model_metadata(
    model_type: str,
    budget: int,
    cost: int,
    stop_reason: str,
    node_qps: float,
    node_count: int,
    base_model_id: str = "",
) -> dict[str, Any]:
    """Every figure of a trained model (FIGURES), named as AutoML's image classification
    metadata names them; int64 fields are strings, as in the API's JSON."""
    return {
        "baseModelId": base_model_id,
        "modelType": model_type,
        "trainBudgetMilliNodeHours": str(budget),
        "trainCostMilliNodeHours": str(cost),
        "stopReason": stop_reason,
        "nodeQps": round(node_qps, 2),
        "nodeCount": str(node_count),
    }


def model_resource(
    name: str,
    display_name: str,
    dataset_id: str,
    create_time: str,
    task: TaskSettings,
    figures: dict[str, Any],
) -> dict[str, Any]:
    """The Model, with the figures its task's metadata message has fields for."""
    return {
        "name": name,
        "displayName": display_name,
        "datasetId": dataset_id,
        "createTime": create_time,
        "updateTime": utc_now(),
        "deploymentState": "UNDEPLOYED",
        task.metadata_key: {key: figures[key] for key in task.automl_metadata_fields},
    }


def model_details(
    model: dict[str, Any], task_name: str, expire_time: str, figures: dict[str, Any]
) -> dict[str, Any]:
    """``model_details.json``: what AutoML's Model has no field for, beside the Model."""
    return {"name": model["name"], "task": task_name, "expireTime": expire_time, **figures}


def recorded_details(run_dir: Path) -> dict[str, Any]:
    """The figures a training recorded in its run directory's ``model_details.json`` (every
    task's, where a video Model's metadata holds none); empty when it recorded no model."""
    try:
        details = json.loads((run_dir / "model_details.json").read_text())
    except (OSError, ValueError):
        return {}
    return details if isinstance(details, dict) else {}


def metadata_of(model: dict[str, Any]) -> dict[str, Any]:
    """The Model's task metadata (``imageClassificationModelMetadata``, ...), itself, not a
    copy; empty where there is none."""
    found: Any = next((v for k, v in model.items() if k.endswith("ModelMetadata")), {})
    return found if isinstance(found, dict) else {}


def details_of(model: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
    """A stored model's figures and expiry time: its metadata, then its registry tags (which
    hold every figure, where a video Model's metadata holds none). A model recorded before
    model_details.json existed kept them all in its metadata and ``expireTime``."""
    metadata = metadata_of(model)
    details = {key: metadata[key] for key in FIGURES if key in metadata}
    details.update({key: tags[key] for key in FIGURES if key in tags})
    expire = tags.get("expire_time") or model.get("expireTime")
    return {**details, "expireTime": expire} if expire else details


class Operation:
    """The long-running operation (``google.longrunning.Operation``) that wraps one training
    (kept in its run directory's ``operation.json``), batch prediction or export. Its metadata
    and response are ``Any`` messages: each carries its ``@type``."""

    def __init__(
        self,
        operation_id: str,
        path: Path | None,
        details: tuple[str, dict[str, Any]] = ("createModelDetails", {}),
        parent: Parent | None = None,
        api: str = "v1",
    ) -> None:
        self.name = (parent or Parent()).name("operations", operation_id)
        self.path, self.api = path, api
        now = utc_now()
        self.resource: dict[str, Any] = {
            "name": self.name,
            "metadata": {
                "@type": type_url(api, "OperationMetadata"),
                "createTime": now,
                "updateTime": now,
                "progressPercent": 0,
                details[0]: details[1],
            },
            "done": False,
        }
        self._write()

    @classmethod
    def reopen(cls, path: Path, name: str, api: str = "v1") -> Operation:
        """An interrupted operation, running again: not done, its error cleared. A file that is
        not this operation's resource (damaged, edited) is written afresh under ``name``; one
        written before the resources were AutoML-exact is brought up to date."""
        try:
            resource = json.loads(path.read_text())
            valid = isinstance(resource, dict) and resource.get("name") == name
            valid = valid and isinstance(resource.get("metadata"), dict)
        except (OSError, ValueError):
            valid = False
        if not valid:
            return cls(resource_id(name), path, parent=Parent.of_name(name), api=api)
        operation = cls.__new__(cls)
        operation.path, operation.api, operation.name = path, api, name
        operation.resource = resource
        metadata = resource["metadata"]
        metadata["@type"] = type_url(api, "OperationMetadata")
        metadata["progressPercent"] = metadata.pop("progressPercentage", None) or metadata.get(
            "progressPercent", 0
        )
        resource["done"] = False
        resource.pop("error", None)
        resource.pop("response", None)
        metadata["updateTime"] = utc_now()
        operation._write()
        return operation

    @classmethod
    def of_resource(cls, resource: dict[str, Any], api: str = "v1") -> Operation:
        """An operation another process put on record (a detached import's), carried on here:
        kept in memory and published to the store, with no file of its own."""
        operation = cls.__new__(cls)
        operation.path, operation.api, operation.name = None, api, resource["name"]
        operation.resource = resource
        return operation

    def progress(self, fraction: float) -> None:
        if self.resource["done"]:
            return
        metadata = self.resource["metadata"]
        metadata["progressPercent"] = int(max(0.0, min(1.0, fraction)) * 100)
        metadata["updateTime"] = utc_now()
        self._write()

    def partial_failures(self, failures: list[dict[str, Any]]) -> None:
        """``google.rpc.Status`` records of inputs that failed while the rest succeeded."""
        self.resource["metadata"]["partialFailures"] = failures

    def succeed(self, message: str, response: dict[str, Any]) -> None:
        """Done, with ``response`` as AutoML's ``message`` (Model, BatchPredictResult), or
        ``google.protobuf.Empty`` for message ``""``."""
        self.resource["metadata"]["progressPercent"] = 100
        packed = type_url(self.api, message) if message else EMPTY
        self._end(response={"@type": packed, **response})

    def fail(self, code: int, message: str) -> None:
        self._end(error={"code": int(code), "message": message})

    def _end(self, **outcome: Any) -> None:
        self.resource["metadata"]["updateTime"] = utc_now()
        self.resource["done"] = True
        self.resource.update(outcome)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.resource)


def progress_of(operation: dict[str, Any]) -> int:
    """An operation's progress, also from one written before the field was AutoML's."""
    metadata = operation.get("metadata", {})
    return int(metadata.get("progressPercent", metadata.get("progressPercentage", 0)))
