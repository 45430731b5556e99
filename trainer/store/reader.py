"""Fast read-only access to the MLflow store, for the management verbs.

Importing ``mlflow`` and opening its SQLAlchemy store takes about 2.5 s on a small CPU, more than
the whole latency budget of `models list` (DESIGN.md: answer well under 2 s). Reads therefore go
to MLflow's SQLite tables directly, or to its documented REST API for a tracking server; writes
(cancel, delete) still go through MLflow's client.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

# The registered-model tag that holds this project's Model resource (AutoML's JSON). The
# description is a short Markdown summary for MLflow's UI; the previous release kept the JSON
# there instead, and it is still read from there when the tag is absent.
MODEL_TAG = "model_json"


@dataclass
class RegisteredModel:
    name: str
    description: str
    tags: dict[str, str] = field(default_factory=dict)

    def resource(self) -> dict[str, Any] | None:
        """The Model resource this project recorded: the ``model_json`` tag, or for an entry
        registered by the previous release, its description. None for an entry that is not
        this project's (the registry is shared): the verbs pass it by."""
        if MODEL_TAG in self.tags:
            return _model_resource(self.tags[MODEL_TAG])
        return _model_resource(self.description)


def _model_resource(text: str | None) -> dict[str, Any] | None:
    try:
        found = json.loads(text or "")
    except ValueError:
        return None
    fields = ("name", "displayName", "createTime")
    if isinstance(found, dict) and all(isinstance(found.get(key), str) for key in fields):
        return found
    return None


@dataclass
class RunRecord:
    run_id: str
    artifact_uri: str
    tags: dict[str, str] = field(default_factory=dict)


class StoreReader(Protocol):
    def registered_models(self) -> list[RegisteredModel]: ...
    def registered_model(self, name: str) -> RegisteredModel | None: ...
    def runs(self) -> list[RunRecord]: ...
    def run_tag(self, run_id: str, key: str) -> str | None: ...


def local_artifact_root(tracking_uri: str) -> Path | None:
    """Where a local SQLite store keeps its runs' artifacts: ``mlartifacts/`` beside the
    database (see store.py); None for a tracking server, which keeps its own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"


def open_reader(tracking_uri: str, experiment: str) -> StoreReader:
    if tracking_uri.startswith(("http://", "https://")):
        return RestReader(tracking_uri.rstrip("/"), experiment)
    if tracking_uri.startswith("sqlite:///"):
        return SqliteReader(Path(tracking_uri.removeprefix("sqlite:///")), experiment)
    raise ValueError(f"unsupported tracking URI {tracking_uri!r}: use sqlite:/// or http(s)://")


class SqliteReader:
    def __init__(self, database: Path, experiment: str) -> None:
        self.database, self.experiment = database, experiment

    def _query(self, sql: str, *params: Any) -> list[tuple]:
        if not self.database.is_file():
            return []
        # Read-only, and patient with a training that is writing at the same moment.
        uri = f"file:{self.database.resolve()}?mode=ro"
        try:
            with sqlite3.connect(uri, uri=True, timeout=30) as connection:
                return connection.execute(sql, params).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):  # a store that MLflow is creating right now
                return []
            raise

    def registered_models(self) -> list[RegisteredModel]:
        models = {
            name: RegisteredModel(name, description or "")
            for name, description in self._query("SELECT name, description FROM registered_models")
        }
        for key, value, name in self._query("SELECT key, value, name FROM registered_model_tags"):
            if name in models:
                models[name].tags[key] = value
        return list(models.values())

    def registered_model(self, name: str) -> RegisteredModel | None:
        rows = self._query("SELECT description FROM registered_models WHERE name = ?", name)
        if not rows:
            return None
        tags = self._query("SELECT key, value FROM registered_model_tags WHERE name = ?", name)
        return RegisteredModel(name, rows[0][0] or "", dict(tags))

    def runs(self) -> list[RunRecord]:
        rows = self._query(
            "SELECT r.run_uuid, r.artifact_uri FROM runs r JOIN experiments e "
            "ON r.experiment_id = e.experiment_id "
            "WHERE e.name = ? AND r.lifecycle_stage = 'active'",
            self.experiment,
        )
        runs = {run_id: RunRecord(run_id, artifact_uri) for run_id, artifact_uri in rows}
        for key, value, run_id in self._query("SELECT key, value, run_uuid FROM tags"):
            if run_id in runs:
                runs[run_id].tags[key] = value
        return list(runs.values())

    def run_tag(self, run_id: str, key: str) -> str | None:
        rows = self._query("SELECT value FROM tags WHERE run_uuid = ? AND key = ?", run_id, key)
        return rows[0][0] if rows else None


class RestReader:
    """MLflow's REST API, authenticated as MLflow's own client does (MLFLOW_TRACKING_TOKEN, or
    MLFLOW_TRACKING_USERNAME and _PASSWORD, or the URI's user:password@), every page read."""

    PAGE = 1000

    def __init__(self, base_url: str, experiment: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.headers = {"Content-Type": "application/json", **_auth_header(parts)}
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""
        self.base_url = urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
        self.experiment = experiment

    def _call(self, path: str, body: dict[str, Any] | None = None, **query: Any) -> dict:
        url = f"{self.base_url}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return {}
            raise

    def _pages(self, path: str, key: str, body: dict[str, Any] | None = None) -> list[dict]:
        """Every result of a search endpoint, following ``next_page_token``."""
        found: list[dict] = []
        token = None
        while True:
            if body is None:  # a GET search: paging in the query
                query: dict[str, Any] = {"max_results": self.PAGE}
                if token:
                    query["page_token"] = token
                page = self._call(path, **query)
            else:
                page = self._call(path, {**body, "max_results": self.PAGE,
                                         **({"page_token": token} if token else {})})  # fmt: skip
            found += page.get(key, [])
            token = page.get("next_page_token")
            if not token:
                return found

    @staticmethod
    def _model(found: dict[str, Any]) -> RegisteredModel:
        tags = {tag["key"]: tag.get("value", "") for tag in found.get("tags", [])}
        return RegisteredModel(found["name"], found.get("description", ""), tags)

    def registered_models(self) -> list[RegisteredModel]:
        found = self._pages("registered-models/search", "registered_models")
        return [self._model(m) for m in found]

    def registered_model(self, name: str) -> RegisteredModel | None:
        found = self._call("registered-models/get", name=name)
        return self._model(found["registered_model"]) if "registered_model" in found else None

    def run_tag(self, run_id: str, key: str) -> str | None:
        run = self._call("runs/get", run_id=run_id).get("run", {})
        tags = {t["key"]: t.get("value") for t in run.get("data", {}).get("tags", [])}
        return tags.get(key)

    def runs(self) -> list[RunRecord]:
        experiment = self._call("experiments/get-by-name", experiment_name=self.experiment)
        if "experiment" not in experiment:
            return []
        body = {"experiment_ids": [experiment["experiment"]["experiment_id"]]}
        runs = []
        for run in self._pages("runs/search", "runs", body):
            tags = {t["key"]: t.get("value", "") for t in run.get("data", {}).get("tags", [])}
            runs.append(RunRecord(run["info"]["run_id"], run["info"]["artifact_uri"], tags))
        return runs


def _auth_header(parts: urllib.parse.SplitResult) -> dict[str, str]:
    """The Authorization header MLflow's client would send to this server, if any."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or urllib.parse.unquote(parts.username or "")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD") or urllib.parse.unquote(
        parts.password or ""
    )
    if not user and not password:
        return {}
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {credentials}"}
