"""AutoML-shaped resources (Model, Operation) and their atomic JSON files.

Field names follow AutoML v1; int64 fields are strings, as in that API.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def new_id(prefix: str) -> str:
    """An AutoML-style ID: the task's prefix and 19 random digits."""
    return f"{prefix}{secrets.randbelow(9 * 10**18) + 10**18}"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """The inverse of ``utc_now``: an RFC 3339 UTC timestamp as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def expired_on(tags: dict[str, str]) -> str | None:
    """A registered model's expiry time when it has passed (its ``expire_time`` tag), else None."""
    expire = tags.get("expire_time")
    return expire if expire and parse_time(expire) < datetime.now(timezone.utc) else None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file beside ``path`` and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def add_months(timestamp: str, months: int) -> str:
    """An RFC 3339 UTC timestamp ``months`` later, the day clamped to the month's length."""
    moment = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%fZ")
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    for day in range(moment.day, 27, -1):
        try:
            return moment.replace(year=year, month=month, day=day).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        except ValueError:
            continue
    return moment.replace(year=year, month=month, day=min(moment.day, 28)).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )


def model_resource(
    model_id: str,
    display_name: str,
    dataset_id: str,
    create_time: str,
    metadata_key: str,
    metadata: dict[str, Any],
    lifespan_months: int,
) -> dict[str, Any]:
    return {
        "name": f"models/{model_id}",
        "displayName": display_name,
        "datasetId": dataset_id,
        "createTime": create_time,
        "updateTime": utc_now(),
        "expireTime": add_months(create_time, lifespan_months),
        "deploymentState": "UNDEPLOYED",
        metadata_key: metadata,
    }


def model_metadata(
    model_type: str,
    budget: int,
    cost: int,
    stop_reason: str,
    node_qps: float,
    node_count: int,
    base_model_id: str = "",
) -> dict[str, Any]:
    return {
        "baseModelId": base_model_id,
        "modelType": model_type,
        "trainBudgetMilliNodeHours": str(budget),
        "trainCostMilliNodeHours": str(cost),
        "stopReason": stop_reason,
        "nodeQps": round(node_qps, 2),
        "nodeCount": str(node_count),
    }


class Operation:
    """The long-running operation that wraps one training (kept in its run directory's
    ``operation.json``) or one export."""

    def __init__(
        self,
        operation_id: str,
        path: Path | None,
        details: tuple[str, dict[str, Any]] = ("createModelDetails", {}),
    ) -> None:
        self.name = f"operations/{operation_id}"
        self.path = path
        now = utc_now()
        self.resource: dict[str, Any] = {
            "name": self.name,
            "metadata": {
                "createTime": now,
                "updateTime": now,
                "progressPercentage": 0,
                details[0]: details[1],
            },
            "done": False,
        }
        self._write()

    @classmethod
    def reopen(cls, path: Path) -> Operation:
        """An interrupted operation, running again: not done, its error cleared."""
        operation = cls.__new__(cls)
        operation.path = path
        operation.resource = json.loads(path.read_text())
        operation.name = operation.resource["name"]
        operation.resource["done"] = False
        operation.resource.pop("error", None)
        operation.resource["metadata"]["updateTime"] = utc_now()
        operation._write()
        return operation

    def progress(self, fraction: float) -> None:
        if self.resource["done"]:
            return
        metadata = self.resource["metadata"]
        metadata["progressPercentage"] = int(max(0.0, min(1.0, fraction)) * 100)
        metadata["updateTime"] = utc_now()
        self._write()

    def succeed(self, model: dict[str, Any]) -> None:
        self.resource["metadata"]["progressPercentage"] = 100
        self._end(response=model)

    def fail(self, code: int, message: str) -> None:
        self._end(error={"code": code, "message": message})

    def _end(self, **outcome: Any) -> None:
        self.resource["metadata"]["updateTime"] = utc_now()
        self.resource["done"] = True
        self.resource.update(outcome)
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            write_json_atomic(self.path, self.resource)
