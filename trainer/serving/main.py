"""`python -m trainer.serving PACKAGE`: one model's server, as a deployment runs it and as the
Docker package's entrypoint runs it. LitServe's workers load the model (one per GPU, or
``--workers`` on a CPU); ``/health`` answers 200 once every worker has loaded it.

LitServe installs no SIGTERM handler: without one, SIGTERM killed the main process and left its
workers behind, and dropped the requests in flight. Here SIGTERM drains: the HTTP processes stop
taking connections and finish what they took (uvicorn's graceful shutdown), then LitServe stops
its workers, and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import litserve as ls

from trainer.errors import UserError
from trainer.serving.deployments import online_defaults


def parser() -> argparse.ArgumentParser:
    defaults = online_defaults()
    found = argparse.ArgumentParser(
        prog="python -m trainer.serving",
        description="Serve one model's online prediction: AutoML's models.predict and "
        "TF Serving's /v1/models/default:predict, with dynamic batching (LitServe).",
    )
    found.add_argument("package", help="a serving package (models deploy or export docker)")
    found.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "0.0.0.0", "::"])
    found.add_argument("--port", type=int, default=8080)
    found.add_argument("--workers", type=int, default=defaults["node_count"],
                       help="inference workers on a CPU (the model's nodeCount)")  # fmt: skip
    found.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda"])
    found.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"])
    found.add_argument("--batch-timeout-ms", type=float, default=defaults["batch_timeout_ms"])
    found.add_argument("--request-timeout-seconds", type=float,
                       default=defaults["request_timeout_seconds"])  # fmt: skip
    found.add_argument("--max-body-bytes", type=int, default=defaults["max_body_bytes"])
    found.add_argument(
        "--api-key-file", default=None,
        help="every request but /health must carry the key in this file",
    )  # fmt: skip
    return found


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        server = build_server(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    main_process = os.getpid()

    def on_sigterm(*_: Any) -> None:
        if os.getpid() == main_process:
            server.drain_in_background()
        else:  # an HTTP process forked with this handler: uvicorn re-raises once it has drained
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")
    end_children()


def end_children() -> None:
    """Exit only once no process of this server is left. LitServe SIGKILLs a worker that has not
    ended 5 s after its SIGTERM, without waiting for it; and multiprocessing's resource tracker
    (spawn starts one) ends only when it notices that this process has gone, a moment later."""
    for child in multiprocessing.active_children():
        child.join(timeout=10)
    tracker = getattr(resource_tracker, "_resource_tracker", None)
    if tracker is not None and hasattr(tracker, "_stop"):
        tracker._stop()  # closes its pipe and waits for it: private, hence the guard


def build_server(args: argparse.Namespace) -> Any:
    import json

    import torch

    from trainer.server.guard import Guard, is_loopback, read_api_key
    from trainer.serving.model_api import DeployedModel
    from trainer.serving.package import PACKAGE_FILE
    from trainer.serving.spec import OnlineSpec

    package = Path(args.package).resolve()
    try:
        model = json.loads((package / PACKAGE_FILE).read_text())["model"]
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"{package} is not a serving package ({error})") from None
    api_key = read_api_key(args.api_key_file)
    if not is_loopback(args.host) and api_key is None:
        raise UserError(f"--host {args.host} is reachable from other machines: give --api-key-file")
    most = online_defaults()["max_node_count"]
    if not 1 <= args.workers <= most:
        raise UserError(f"--workers {args.workers}: give 1 to {most}")
    if args.max_batch_size < 1:
        raise UserError(f"--max-batch-size {args.max_batch_size}: give 1 or more")
    # Children are spawned, not forked, so that none but the HTTP processes (forked by LitServe)
    # holds the listening socket: once they close it, a new connection is refused at once.
    multiprocessing.set_start_method("spawn", force=True)
    gpu = args.accelerator == "cuda" or (args.accelerator == "auto" and torch.cuda.is_available())
    spec = OnlineSpec(str(model["name"]).rsplit("/", 1)[-1], args.request_timeout_seconds)
    api = DeployedModel(package, 1 if gpu else args.workers, args.max_batch_size,
                        args.batch_timeout_ms / 1000, spec)  # fmt: skip
    guard = {"api_key": api_key, "max_body_bytes": args.max_body_bytes}
    return ModelServer(
        api,
        accelerator="cuda" if gpu else "cpu",
        devices="auto",
        workers_per_device=1 if gpu else args.workers,
        # LitServe drops what waited in its queue this long: after the spec's own deadline
        # (spec.py), so that only images whose client was already answered 504 are dropped.
        timeout=args.request_timeout_seconds + 1,
        middlewares=[(Guard, guard)],
        disable_openapi_url=True,
    )


class ModelServer(ls.LitServer):
    """LitServer with a drain on SIGTERM; it keeps what its ``run`` keeps to itself."""

    _listening: list[socket.socket] = []
    _http: dict[Any, Any] = {}

    def _start_server(self, port: Any, count: int, log_level: str, sockets: Any,
                      worker_type: str, **kwargs: Any) -> dict[Any, Any]:  # fmt: skip
        self._listening = list(sockets or [])
        self._http = super()._start_server(port, count, log_level, sockets, worker_type, **kwargs)
        return self._http

    def drain_in_background(self) -> None:
        # Not in the signal handler itself: the main thread is inside a call to LitServe's
        # manager, and the shutdown event is set through the same kind of call.
        threading.Thread(target=self.drain, name="drain", daemon=True).start()

    def drain(self) -> None:
        logging.getLogger("trainer").warning("SIGTERM: finishing the requests in flight")
        for process in self._http.values():
            process.terminate()  # uvicorn: stop accepting, finish the requests it has
        for listening in self._listening:
            listening.close()  # this process's copy: new connections are refused now
        for process in self._http.values():
            process.join(timeout=self.uvicorn_graceful_timeout)
        if self._shutdown_event is not None:
            self._shutdown_event.set()  # LitServe's run() then stops its workers
