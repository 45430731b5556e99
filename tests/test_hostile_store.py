"""Issue 29's store cases, kept apart from test_hostile_inputs.py: a tracking server that
redirects the credentials elsewhere, pages forever, never answers or speaks TLS with its own CA;
a shared registry holding another project's entries, or entries of ours with bad times. Each is
skipped and reported, or refused with exit code 2 and one line: never a traceback or a hang."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LOCAL, cli_in_process, run_trainer
from tests.test_registry_records import FIGURES_OF_NEW as FIGURES_OF
from trainer.errors import UserError
from trainer.store.reader import MODEL_TAG, RestReader

API = "/api/2.0/mlflow"
BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()
ENVIRONMENT = (  # what the reader reads: none of this machine's may leak into a test
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


# -- a stand-in for a tracking server: real HTTP on 127.0.0.1, in a thread ------------------------

# A request's path and body in, the status, extra headers and JSON body to answer with out.
Reply = Callable[[str, dict[str, Any]], tuple[int, dict[str, str], dict[str, Any]]]


@dataclass
class Seen:
    path: str
    authorization: str
    body: dict[str, Any]


@contextmanager
def serving(reply: Reply, tls: ssl.SSLContext | None = None) -> Iterator[tuple[int, list[Seen]]]:
    """A server whose answers ``reply`` gives; its port, and every request it was sent."""
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            seen.append(Seen(self.path, self.headers.get("Authorization", ""), body))
            status, headers, answer = reply(self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer()

        def do_POST(self) -> None:  # noqa: N802
            self._answer()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def one_model(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    return 200, {}, {"registered_model": {"name": "m", "description": "found"}}


# -- credentials across a redirect -----------------------------------------------------------------


def test_a_redirect_to_another_origin_does_not_get_the_credentials() -> None:
    """The tracking server answers 302 to another port, then to another host name for the
    same address: neither gets the Authorization header, a redirect on its own origin does."""
    with serving(one_model) as (elsewhere, seen_elsewhere):

        def redirecting(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict]:
            if path.startswith(f"{API}/registered-models/get?name=same"):
                return 302, {"Location": f"{API}/registered-models/get?name=m"}, {}
            if path.startswith(f"{API}/registered-models/get?name=port"):
                target = f"http://127.0.0.1:{elsewhere}{API}/registered-models/get?name=m"
                return 302, {"Location": target}, {}
            if path.startswith(f"{API}/registered-models/get?name=host"):
                return 302, {"Location": f"http://localhost:{port}/host/"}, {}
            return one_model(path, body)

        with serving(redirecting) as (port, seen):
            reader = RestReader(f"http://alice:s3cret@127.0.0.1:{port}", "vision-trainer")
            for name in ("same", "port", "host"):
                found = reader.registered_model(name)
                assert found is not None and found.description == "found"

    by_path = [(s.path.split("?")[-1], s.authorization) for s in seen]
    assert by_path[:2] == [("name=same", BASIC), ("name=m", BASIC)]  # its own origin: kept
    assert ("name=port", BASIC) in by_path and ("name=host", BASIC) in by_path
    assert [s.authorization for s in seen_elsewhere] == [""]  # another port
    assert [s.authorization for s in seen if s.path == "/host/"] == [""]  # another host name


def test_a_bearer_token_is_not_sent_across_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    with serving(one_model) as (elsewhere, seen_elsewhere):
        target = f"http://127.0.0.1:{elsewhere}/moved"
        with serving(lambda path, body: (302, {"Location": target}, {})) as (port, seen):
            assert RestReader(f"http://127.0.0.1:{port}", "x").registered_model("m") is not None
    assert [s.authorization for s in seen] == ["Bearer t0ken"]
    assert [s.authorization for s in seen_elsewhere] == [""]


# -- paging and waiting ----------------------------------------------------------------------------


def test_a_repeated_page_token_ends_in_one_line() -> None:
    """A server that answers every page with the same ``next_page_token`` (it stops after 50,
    so that a reader without the check ends and fails here rather than hangs)."""

    pages = iter(range(50))

    def same_token(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict]:
        if path.startswith(f"{API}/experiments/get-by-name"):
            return 200, {}, {"experiment": {"experiment_id": "1"}}
        more = {"next_page_token": "again"} if next(pages, None) is not None else {}
        return 200, {}, {"runs": [{"info": {"run_id": "r", "artifact_uri": ""}}], **more}

    repeated = pytest.raises(UserError, match="page token 'again' came before")
    with serving(same_token) as (port, seen), repeated as refused:
        RestReader(f"http://127.0.0.1:{port}", "vision-trainer").runs()
    assert "\n" not in str(refused.value) and f"127.0.0.1:{port}" in str(refused.value)
    assert len([s for s in seen if s.path.endswith("runs/search")]) == 2


def test_endless_pages_end_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every page names a new one (up to 100, so that a reader without a cap ends)."""
    monkeypatch.setattr(RestReader, "MAX_PAGES", 5)

    def endless(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict]:
        page = int(path.partition("page_token=")[2] or 0)
        more = {"next_page_token": str(page + 1)} if page < 100 else {}
        return 200, {}, {"registered_models": [{"name": f"m{page}"}], **more}

    with serving(endless) as (port, seen), pytest.raises(UserError, match="more than 5 pages"):
        RestReader(f"http://127.0.0.1:{port}", "vision-trainer").registered_models()
    assert len(seen) == 5


def test_a_server_that_never_answers_ends_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """It accepts the connection (the kernel's backlog does) and never says a word."""
    monkeypatch.setattr(RestReader, "TIMEOUT", 1)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(UserError, match="no answer within 1 s"):
            RestReader(f"http://127.0.0.1:{port}", "vision-trainer").registered_models()
    assert time.monotonic() - started < 10


# -- TLS as MLflow's client configures it ----------------------------------------------------------


@dataclass
class Pki:
    ca: Path  # the CA certificate that signed the two below
    server: Path  # certificate and key, for 127.0.0.1
    client: Path  # certificate and key


def _certificate(name: str, key: Any, issuer: tuple[Any, Any] | None = None) -> Any:
    """A certificate for ``name``: a CA's, self-signed, where no ``issuer`` (its certificate
    and key) signs it, else a leaf's for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer is None:
        return builder.sign(key, hashes.SHA256())
    authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key())
    address = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    builder = builder.add_extension(authority, False)
    builder = builder.add_extension(x509.SubjectAlternativeName([address]), False)
    return builder.sign(issuer[1], hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key)
    paths = Pki(folder / "ca.pem", folder / "server.pem", folder / "client.pem")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, path in (("127.0.0.1", paths.server), ("alice", paths.client)):
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _certificate(name, key, (ca, ca_key))
        path.write_bytes(
            certificate.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths


def server_tls(pki: Pki, client_certificate: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server)
    if client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(pki.ca)
    return context


def read_one(port: int) -> Any:
    return RestReader(f"https://127.0.0.1:{port}", "vision-trainer").registered_model("m")


def test_tls_verification_follows_mlflows_variables(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serving(one_model, server_tls(pki)) as (port, _):
        with pytest.raises(UserError, match="CERTIFICATE_VERIFY_FAILED") as unknown_ca:
            read_one(port)  # the system's CAs do not know this one
        assert "MLFLOW_TRACKING_SERVER_CERT_PATH" in str(unknown_ca.value)

        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(pki.ca))
        assert read_one(port).description == "found"

        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")  # both: MLflow refuses it
        with pytest.raises(UserError, match="both set"):
            read_one(port)

        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        assert read_one(port).description == "found"  # no verification at all

        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "yes")
        with pytest.raises(UserError, match="use true, false, 1 or 0"):
            read_one(port)


def test_a_client_certificate_comes_from_mlflows_variable(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(pki.ca))
    with serving(one_model, server_tls(pki, client_certificate=True)) as (port, seen):
        with pytest.raises(UserError, match="cannot be read"):
            read_one(port)  # the server asks for a certificate and gets none
        monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", str(pki.client))
        assert read_one(port).description == "found"
    assert len(seen) == 1

    monkeypatch.setenv("MLFLOW_TRACKING_CLIENT_CERT_PATH", str(pki.client.with_name("none.pem")))
    with pytest.raises(UserError, match="cannot be used"):
        read_one(port)


# -- a shared registry: another project's entries, and ours with bad times -------------------------

GOOD = "ICN5555555555555555551"
NAIVE = "ICN5555555555555555552"  # its expire_time tag has no time zone
GARBAGE = "ICN5555555555555555553"  # its expire_time tag is not a time
BAD_CREATE = "ICN5555555555555555554"  # its createTime (and create_time tag) are not times
OURS = {  # createTime, expire_time
    GOOD: ("2026-12-01T09:00:00.000000Z", "2099-06-01T09:00:00.000000Z"),
    NAIVE: ("2026-12-02T09:00:00.000000Z", "2099-06-01T09:00:00"),
    GARBAGE: ("2026-12-03T09:00:00.000000Z", "next tuesday"),
    BAD_CREATE: ("yesterday", "2099-06-01T09:00:00.000000Z"),
}
# Other teams' entries: plain text, nothing, and JSON of the very shape a Model's first fields
# have (name, displayName, createTime), which is still not this project's.
FOREIGN = {
    "churn-classifier": "Gradient-boosted churn model, owned by the data team.",
    "ranker": None,
    "shaped-like-ours": json.dumps(
        {
            "name": "projects/data/locations/eu/models/shaped-like-ours",
            "displayName": "Shaped",
            "createTime": "2026-11-30T00:00:00Z",
        }
    ),
}


def model_of(model_id: str) -> dict[str, Any]:
    create = OURS[model_id][0]
    return {
        "name": f"{LOCAL}/models/{model_id}",
        "displayName": f"model_{model_id[-1]}",
        "datasetId": "e" * 16,
        "createTime": create,
        "updateTime": create,
        "deploymentState": "UNDEPLOYED",
        "imageClassificationModelMetadata": FIGURES_OF,
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with four models of ours (one sound, three with a bad time) and other projects'
    entries beside them, registered with MLflow's own client; the folder that holds it."""
    from trainer.store.store import Store, metadata_tags

    cwd = tmp_path_factory.mktemp("shared_registry")
    client = Store(f"sqlite:///{cwd / 'mlflow.db'}", "vision-trainer").client
    for model_id, (_, expire) in OURS.items():
        model = model_of(model_id)
        tags = metadata_tags(model, {"expireTime": expire, **FIGURES_OF})
        tags.update({MODEL_TAG: json.dumps(model), "task": "image_classification"})
        client.create_registered_model(model_id, tags=tags, description="ours")
    for name, description in FOREIGN.items():
        client.create_registered_model(name, description=description)
    return cwd


def bad_times(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


EXPECTED_WARNINGS = [
    f"model {NAIVE}'s expire_time tag '2099-06-01T09:00:00' is not an RFC 3339 time",
    f"model {GARBAGE}'s expire_time tag 'next tuesday' is not an RFC 3339 time",
    f"model {BAD_CREATE}'s createTime field 'yesterday' is not an RFC 3339 time",
    f"model {BAD_CREATE}'s create_time tag 'yesterday' is not an RFC 3339 time",
]


def test_models_list_skips_other_projects_and_reports_bad_times(
    registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog
) -> None:
    listing = cli_in_process(registry, monkeypatch, capsys, "models", "list")
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()[1:]
    # Every model of ours, newest first; the one whose creation time is unknown last.
    assert [row.split()[0] for row in rows] == [GARBAGE, NAIVE, GOOD, BAD_CREATE]
    assert not any(name in listing.stdout for name in FOREIGN)
    warnings = bad_times(caplog)
    assert len(warnings) == len(EXPECTED_WARNINGS)
    for expected in EXPECTED_WARNINGS:
        assert any(expected in warning for warning in warnings), (expected, warnings)

    listed = cli_in_process(registry, monkeypatch, capsys, "models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)["model"]
    assert models == [model_of(GARBAGE), model_of(NAIVE), model_of(GOOD), model_of(BAD_CREATE)]


def test_the_report_is_one_line_each_on_stderr(registry: Path, tmp_path: Path) -> None:
    """A real process: no logging set up, the warnings still reach stderr, stdout stays JSON."""
    listed = run_trainer("models", "list", "--json", cwd=registry, home=tmp_path, timeout=120)
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr
    assert len(json.loads(listed.stdout)["model"]) == len(OURS)
    reported = [line for line in listed.stderr.splitlines() if line.startswith("warning: model")]
    assert len(reported) == len(EXPECTED_WARNINGS)
    for expected in EXPECTED_WARNINGS:
        assert any(expected in line for line in reported), (expected, listed.stderr)


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_another_projects_entry_is_named_so_in_one_line(
    registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, name: str
) -> None:
    for verb in (["models", "get", name], ["predict", name, "--input", "x.csv", "--output", "o"]):
        refused = cli_in_process(registry, monkeypatch, capsys, *verb)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        (line,) = refused.stderr.strip().splitlines()
        assert f"model {name!r} is not in this project" in line and "another project's" in line


def test_models_get_shows_a_bad_record_and_reports_it(
    registry: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, caplog
) -> None:
    got = cli_in_process(registry, monkeypatch, capsys, "models", "get", NAIVE, "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == model_of(NAIVE)
    assert [w for w in bad_times(caplog) if "expire_time" in w and NAIVE in w]


@pytest.mark.parametrize(
    ("model_id", "verb"),
    [
        (NAIVE, ["predict", NAIVE, "--input", "x.csv", "--output", "o"]),
        (GARBAGE, ["predict", GARBAGE, "--input", "x.csv", "--output", "o"]),
        (GARBAGE, ["models", "export", GARBAGE]),
        (NAIVE, ["models", "evaluate", NAIVE]),
    ],
)
def test_a_verb_that_uses_a_model_refuses_a_bad_expiry_in_one_line(
    registry: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    model_id: str,
    verb: list[str],
) -> None:
    refused = cli_in_process(registry, monkeypatch, capsys, *verb)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert f"model {model_id}'s expire_time tag" in line and "time zone" in line
