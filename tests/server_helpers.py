"""A real `python -m trainer serve` process on 127.0.0.1 and the clients that drive it: Google's
AutoML client over REST, and a plain HTTP client."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import REPO, run_trainer

STARTUP_SECONDS = 60


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    cwd: Path
    home: Path

    def client(self, api_key: str | None = None) -> Any:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import automl_v1

        options = ClientOptions(api_endpoint=self.url, api_key=api_key)
        credentials = None if api_key else AnonymousCredentials()
        return automl_v1.AutoMlClient(
            transport="rest", client_options=options, credentials=credentials
        )

    def prediction_client(self) -> Any:
        return prediction_client(self.url)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=30)


def prediction_client(url: str) -> Any:
    """Google's PredictionServiceClient over REST, pointed at ``url``."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import automl_v1

    return automl_v1.PredictionServiceClient(
        transport="rest",
        client_options=ClientOptions(api_endpoint=url),
        credentials=AnonymousCredentials(),
    )


def start_server(
    cwd: Path, home: Path, *args: str, env: dict | None = None, store: tuple[str, ...] = ()
) -> Server:
    """``python -m trainer [STORE] serve --port 0 ARGS`` in ``cwd`` (``store``: the verbs' own
    ``--tracking-uri`` and ``--experiment``); returns once it listens (its first line on stdout
    is its address)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    environment.update({"VISION_TRAINER_HOME": str(home), "PYTHONPATH": str(REPO), **(env or {})})
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", *store, "serve", "--port", "0", *args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=(cwd / "server.log").open("ab"),
        text=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], STARTUP_SECONDS)
    line = process.stdout.readline().strip() if ready else ""
    if not line.startswith("http://"):
        process.kill()
        raise AssertionError(f"no server: {(cwd / 'server.log').read_text()[-3000:]}")
    return Server(process, line, cwd, home)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """A plain HTTP call: its status and its JSON."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


def post(url: str, body: Any, headers: dict | None = None) -> tuple[int, dict, dict]:
    """A plain HTTP POST of JSON: its status, JSON and headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read()), dict(answer.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), dict(error.headers)


def session_processes(session: int) -> list[int]:
    """The processes of a session (a deployment's server starts one of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def batch_predicted(cwd: Path, home: Path, model_id: str, paths: list[Path]) -> dict[str, dict]:
    """Batch prediction's record of each image, every label or box (score threshold 0)."""
    rows = cwd / f"online-{model_id}.csv"
    rows.write_text("".join(f"{path}\n" for path in paths))
    ran = run_trainer("predict", model_id, "--input", str(rows), "--output", str(cwd / "batch"),
                      "--score-threshold", "0", cwd=cwd, home=home)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-2000:]
    folder = Path(ran.stdout.strip().splitlines()[-1])
    records = [json.loads(line) for f in sorted(folder.glob("*_1.jsonl")) for line in f.open()]
    return {record["ID"]: record for record in records}
