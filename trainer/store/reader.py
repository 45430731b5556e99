"""Fast read-only access to the MLflow store, for the management verbs.

Importing ``mlflow`` and opening its SQLAlchemy store takes about 2.5 s on a small CPU, more than
the whole latency budget of `models list` (DESIGN.md: answer well under 2 s). Reads therefore go
to MLflow's SQLite tables directly, or to its documented REST API for a tracking server; writes
(cancel, delete) still go through MLflow's client.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import sqlite3
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import IO, Any, Generic, Protocol, TypeVar

from trainer.errors import UserError
from trainer.store.resources import ID_PATTERN

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
        found = _model_resource(self.tags.get(MODEL_TAG, self.description))
        # Ours names this very entry with an ID as new_id makes them: JSON of the same shape
        # from another tool (a name such as "churn", or another entry's ID) is not a Model here.
        if found is None or found["name"].rsplit("/", 1)[-1] != self.name:
            return None
        return found if ID_PATTERN.match(self.name) else None


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


Record = TypeVar("Record", RegisteredModel, RunRecord)


@dataclass
class Listing(Generic[Record]):
    """A list's entries without their records, to be put in order and paged: each entry's key
    (a registered model's name, an operation's run ID) with the ``createTime`` its record holds,
    as recorded (None where the record has none, or is not JSON); ``load`` reads the whole
    records of the keys asked for (those still there), so a page reads only its own."""

    created: list[tuple[str, Any]]
    load: Callable[[Sequence[str]], dict[str, Record]]


class StoreReader(Protocol):
    def registered_models(self) -> list[RegisteredModel]: ...
    def registered_model(self, name: str) -> RegisteredModel | None: ...
    def runs(self) -> list[RunRecord]: ...
    def run_tag(self, run_id: str, key: str) -> str | None: ...
    def runs_tagged(self, key: str, value: str) -> list[RunRecord]: ...
    def model_listing(self) -> Listing[RegisteredModel]: ...
    def operation_listing(self) -> Listing[RunRecord]: ...


OPERATION_TAG = "operation_json"  # the run tag that holds an operation's resource (store.py)


def _recorded(text: str | None, *path: str) -> Any:
    """The value at ``path`` in a record's JSON text; None where there is none."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return None
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _model_created(model: RegisteredModel) -> Any:
    """The createTime of the record ``RegisteredModel.resource`` reads."""
    return _recorded(model.tags.get(MODEL_TAG, model.description), "createTime")


def _listing_in_memory(records: Iterable[Record], key: Callable[[Record], str],
                       created: Callable[[Record], Any]) -> Listing[Record]:  # fmt: skip
    """A listing of records already read whole (a tracking server answers with whole ones)."""
    found = {key(record): record for record in records}

    def load(keys: Sequence[str]) -> dict[str, Record]:
        return {k: found[k] for k in keys if k in found}

    return Listing([(k, created(record)) for k, record in found.items()], load)


def _in_memory_models(models: list[RegisteredModel]) -> Listing[RegisteredModel]:
    return _listing_in_memory(models, lambda model: model.name, _model_created)


def _in_memory_operations(runs: list[RunRecord]) -> Listing[RunRecord]:
    operations = [run for run in runs if OPERATION_TAG in run.tags]
    return _listing_in_memory(
        operations,
        lambda run: run.run_id,
        lambda run: _recorded(run.tags[OPERATION_TAG], "metadata", "createTime"),
    )


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


# Each entry's createTime where RegisteredModel.resource and the operation's JSON hold it, read
# by SQLite's JSON functions: the order of 10,000 entries in about 0.1 s, without their records.
MODEL_TIMES = f"""
    SELECT m.name, CASE
        WHEN t.value IS NOT NULL THEN
            CASE WHEN json_valid(t.value) THEN json_extract(t.value, '$.createTime') END
        WHEN json_valid(m.description) THEN json_extract(m.description, '$.createTime') END
    FROM registered_models m
    LEFT JOIN registered_model_tags t ON t.name = m.name AND t.key = '{MODEL_TAG}'"""
OPERATION_TIMES = f"""
    SELECT r.run_uuid,
        CASE WHEN json_valid(t.value) THEN json_extract(t.value, '$.metadata.createTime') END
    FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id
    JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = '{OPERATION_TAG}'
    WHERE e.name = ? AND r.lifecycle_stage = 'active'"""


class _Lookup(Generic[Record]):
    """A listing's ``load``: a few records looked up by key, or past ``LOOKUP_AT_MOST`` every
    record read at once, and kept for the listing's later loads (a filter that passes most
    entries by asks for more and more of them)."""

    # Past this many, one read of every record is quicker than looking them up
    # (registered_model_tags has no index on a model's name alone), and SQLite's limit on a
    # query's parameters is never near.
    LOOKUP_AT_MOST = 500

    def __init__(
        self,
        some: Callable[[Sequence[str]], dict[str, Record]],
        every: Callable[[], list[Record]],
        key: Callable[[Record], str],
    ) -> None:
        self.some: Callable[[Sequence[str]], dict[str, Record]] = some
        self.every: Callable[[], list[Record]] = every
        self.key: Callable[[Record], str] = key
        self.everything: dict[str, Record] | None = None

    def __call__(self, keys: Sequence[str]) -> dict[str, Record]:
        if self.everything is None and len(keys) > self.LOOKUP_AT_MOST:
            self.everything = {self.key(record): record for record in self.every()}
        if self.everything is None:
            return self.some(keys)
        return {key: self.everything[key] for key in keys if key in self.everything}


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

    def model_listing(self) -> Listing[RegisteredModel]:
        try:
            lookup = _Lookup(self._models_named, self.registered_models, lambda m: m.name)
            return Listing(self._query(MODEL_TIMES), lookup)
        except sqlite3.OperationalError as error:
            _without_json_functions(error)
            return _in_memory_models(self.registered_models())

    def operation_listing(self) -> Listing[RunRecord]:
        try:
            lookup = _Lookup(self._runs_with_ids, self.runs, lambda run: run.run_id)
            return Listing(self._query(OPERATION_TIMES, self.experiment), lookup)
        except sqlite3.OperationalError as error:
            _without_json_functions(error)
            return _in_memory_operations(self.runs())

    def _models_named(self, names: Sequence[str]) -> dict[str, RegisteredModel]:
        marks = ", ".join("?" for _ in names)
        models = {
            name: RegisteredModel(name, description or "")
            for name, description in self._query(
                f"SELECT name, description FROM registered_models WHERE name IN ({marks})", *names
            )
        }
        tags = f"SELECT key, value, name FROM registered_model_tags WHERE name IN ({marks})"
        for key, value, name in self._query(tags, *names):
            if name in models:
                models[name].tags[key] = value
        return models

    def _runs_with_ids(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        marks = ", ".join("?" for _ in run_ids)
        runs = {
            run_id: RunRecord(run_id, artifact_uri)
            for run_id, artifact_uri in self._query(
                f"SELECT run_uuid, artifact_uri FROM runs WHERE run_uuid IN ({marks})", *run_ids
            )
        }
        tags = f"SELECT key, value, run_uuid FROM tags WHERE run_uuid IN ({marks})"
        for key, value, run_id in self._query(tags, *run_ids):
            runs[run_id].tags[key] = value
        return runs

    def runs_tagged(self, key: str, value: str) -> list[RunRecord]:
        """The experiment's active runs whose tag ``key`` is ``value`` (datasets, imports), with
        all their tags: one query each, however many other runs the experiment has."""
        chosen = (
            "SELECT r.run_uuid FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "JOIN tags t ON t.run_uuid = r.run_uuid WHERE e.name = ? "
            "AND r.lifecycle_stage = 'active' AND t.key = ? AND t.value = ?"
        )
        rows = self._query(
            f"SELECT run_uuid, artifact_uri FROM runs WHERE run_uuid IN ({chosen})",
            self.experiment, key, value,
        )  # fmt: skip
        runs = {run_id: RunRecord(run_id, artifact_uri) for run_id, artifact_uri in rows}
        tags = self._query(
            f"SELECT key, value, run_uuid FROM tags WHERE run_uuid IN ({chosen})",
            self.experiment, key, value,
        )  # fmt: skip
        for tag_key, tag_value, run_id in tags:
            if run_id in runs:
                runs[run_id].tags[tag_key] = tag_value
        return list(runs.values())


def _without_json_functions(error: sqlite3.OperationalError) -> None:
    """Passes when SQLite was built without its JSON functions (before 3.38 they were optional):
    the records are then read whole and ordered in Python. Any other error is raised again."""
    if "no such function" not in str(error):
        raise error


class RestReader:
    """MLflow's REST API, authenticated as MLflow's own client does (MLFLOW_TRACKING_TOKEN, or
    MLFLOW_TRACKING_USERNAME and _PASSWORD, or the URI's user:password@) and with its TLS
    settings, every page read. The server's answers are checked as user input is: a server that
    redirects elsewhere gets no credentials there, one that pages forever is given up on."""

    PAGE = 1000
    # A million entries: far more than any registry this project shares. A server that pages on
    # past it (or repeats a page token) is broken, and waiting on it would hang the verb.
    MAX_PAGES = 1000
    TIMEOUT = 30  # seconds for every call: a server that accepts and never answers ends in one line

    def __init__(self, base_url: str, experiment: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.headers = {"Content-Type": "application/json", **_auth_header(parts)}
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else ""
        self.base_url = urllib.parse.urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
        self.experiment = experiment

    @cached_property
    def _opener(self) -> urllib.request.OpenerDirector:
        # Built at the first call, so that a store on local files never reads the TLS settings.
        return urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=tls_context()), SameOriginAuthRedirects()
        )

    def _call(self, path: str, body: dict[str, Any] | None = None, **query: Any) -> dict:
        url = f"{self.base_url}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers=self.headers)
        try:
            with self._opener.open(request, timeout=self.TIMEOUT) as response:
                found = json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return {}
            raise self._unreadable(path, f"it answered {error.code} {error.reason}") from None
        # Refused, timed out, TLS, a dropped connection or a reply that is not JSON: one line.
        except (OSError, ValueError, http.client.HTTPException) as error:
            raise self._unreadable(path, self._reason(error)) from None
        if not isinstance(found, dict):
            raise self._unreadable(path, "its reply is not a JSON object")
        return found

    def _reason(self, error: Exception) -> object:
        reason = getattr(error, "reason", error)  # a URLError wraps what went wrong
        if isinstance(reason, TimeoutError):
            return f"no answer within {self.TIMEOUT} s"
        if isinstance(reason, ssl.SSLCertVerificationError):
            return f"{reason}; MLFLOW_TRACKING_SERVER_CERT_PATH may name the CA bundle to trust"
        return reason

    def _unreadable(self, path: str, reason: object) -> UserError:
        detail = " ".join(str(reason).split())[:200]
        return UserError(f"the tracking server {self.base_url} cannot be read ({path}): {detail}")

    def _page(self, path: str, body: dict[str, Any] | None, token: str | None) -> dict:
        paging: dict[str, Any] = {
            "max_results": self.PAGE,
            **({"page_token": token} if token else {}),
        }
        if body is None:  # a GET search: paging in the query
            return self._call(path, **paging)
        return self._call(path, {**body, **paging})

    def _pages(self, path: str, key: str, body: dict[str, Any] | None = None) -> list[dict]:
        """Every result of a search endpoint, following ``next_page_token`` as far as
        ``MAX_PAGES``, never to a token already followed (that would read forever)."""
        found: list[dict] = []
        followed: set[str] = set()
        token: str | None = None
        for _ in range(self.MAX_PAGES):
            page = self._page(path, body, token)
            items = page.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise self._unreadable(path, f"its {key!r} is not a list of objects")
            found += items
            token = page.get("next_page_token") or None
            if token is None:
                return found
            if not isinstance(token, str) or token in followed:
                repeated = f"its page token {str(token)[:40]!r} came before (or is no text)"
                raise self._unreadable(path, repeated)
            followed.add(token)
        raise self._unreadable(path, f"it has more than {self.MAX_PAGES} pages of {self.PAGE}")

    @staticmethod
    def _model(found: dict[str, Any]) -> RegisteredModel:
        tags = {tag["key"]: tag.get("value", "") for tag in found.get("tags", [])}
        return RegisteredModel(found["name"], found.get("description", ""), tags)

    def registered_models(self) -> list[RegisteredModel]:
        found = self._pages("registered-models/search", "registered_models")
        return [self._model(m) for m in found]

    def model_listing(self) -> Listing[RegisteredModel]:
        # The server answers with whole records: one read of them all, paged here.
        return _in_memory_models(self.registered_models())

    def operation_listing(self) -> Listing[RunRecord]:
        return _in_memory_operations(self.runs())

    def registered_model(self, name: str) -> RegisteredModel | None:
        found = self._call("registered-models/get", name=name)
        return self._model(found["registered_model"]) if "registered_model" in found else None

    def run_tag(self, run_id: str, key: str) -> str | None:
        run = self._call("runs/get", run_id=run_id).get("run", {})
        tags = {t["key"]: t.get("value") for t in run.get("data", {}).get("tags", [])}
        return tags.get(key)

    def runs(self, filter_string: str = "") -> list[RunRecord]:
        experiment = self._call("experiments/get-by-name", experiment_name=self.experiment)
        if "experiment" not in experiment:
            return []
        body: dict[str, Any] = {"experiment_ids": [experiment["experiment"]["experiment_id"]]}
        if filter_string:
            body["filter"] = filter_string
        runs = []
        for run in self._pages("runs/search", "runs", body):
            tags = {t["key"]: t.get("value", "") for t in run.get("data", {}).get("tags", [])}
            runs.append(RunRecord(run["info"]["run_id"], run["info"]["artifact_uri"], tags))
        return runs

    def runs_tagged(self, key: str, value: str) -> list[RunRecord]:
        """The experiment's runs whose tag ``key`` is ``value``, the server filtering them."""
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        return self.runs(f"tags.`{key}` = '{quoted}'")


class SameOriginAuthRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed as urllib follows them, but the credentials only to the origin they
    were given for: urllib copies every header to wherever a redirect points, so a 302 to another
    host (or to plain http) would hand it the tracking server's token or password. Once dropped,
    the header stays dropped for the rest of the chain."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


def _origin(url: str) -> tuple[str, str, int | None]:
    """A URL's origin (RFC 6454): scheme, host and port, the scheme's default port spelled out."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), parts.port or default


def tls_context() -> ssl.SSLContext:
    """The TLS settings MLflow's client takes from the environment (mlflow/utils/rest_utils.py:
    MlflowHostCreds.verify and the ``cert`` it hands requests): MLFLOW_TRACKING_SERVER_CERT_PATH,
    a CA bundle to verify the server with (instead of the default ones); INSECURE_TLS=true, no
    verification at all (both set is refused, as MLflow refuses it); CLIENT_CERT_PATH, a .pem
    holding the client's certificate and key. With neither, requests (MLflow's HTTP client) also
    reads REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE; else the system's CAs stand in for certifi's."""
    insecure = _flag("MLFLOW_TRACKING_INSECURE_TLS")
    server_cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None
    client_cert = os.environ.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None
    if insecure and server_cert:
        raise UserError(
            "MLFLOW_TRACKING_INSECURE_TLS=true and MLFLOW_TRACKING_SERVER_CERT_PATH are both set: "
            "set only one of them, as MLflow requires"
        )
    try:
        context = _unverified() if insecure else _verifying(server_cert)
        if client_cert:
            context.load_cert_chain(client_cert)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise UserError(
            f"the TLS files named by MLFLOW_TRACKING_SERVER_CERT_PATH or "
            f"MLFLOW_TRACKING_CLIENT_CERT_PATH cannot be used: {error}"
        ) from None
    return context


def _verifying(ca_bundle: str | None) -> ssl.SSLContext:
    bundle = ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle and Path(bundle).is_dir():  # requests takes a folder of hashed CA files too
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle or None)


def _unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # before verify_mode: ssl refuses CERT_NONE with it on
    context.verify_mode = ssl.CERT_NONE
    return context


def _flag(name: str) -> bool:
    """A boolean variable as MLflow reads one: true, false, 1 or 0 in any case, else refused."""
    value = os.environ.get(name)
    if value is None:
        return False
    if value.lower() not in ("true", "false", "1", "0"):
        raise UserError(f"{name}={value!r} is invalid: use true, false, 1 or 0")
    return value.lower() in ("true", "1")


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
