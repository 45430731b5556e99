"""`python -m trainer serve`: the arguments, the checks before listening, and uvicorn."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.server.defaults import serve_defaults
from trainer.settings import Workspace, redact


def add_serve_verb(resources: Any) -> None:
    defaults = serve_defaults()
    serve = resources.add_parser(
        "serve",
        help="AutoML's REST API on this machine (Google's client can point at it)",
        description="Serve AutoML's v1 REST API (v1beta1 for video) over this store. Trailing "
        "KEY=VALUE overrides are the defaults of every training the server starts.",
    )
    serve.add_argument(
        "--host",
        default=defaults["host"],
        help="address to bind (default %(default)s; another needs --api-key-file)",
    )
    serve.add_argument("--port", type=int, default=defaults["port"], help="0: any free port")
    serve.add_argument(
        "--data-root",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder requests may read from (repeatable; default: .)",
    )
    serve.add_argument(
        "--output-root",
        action="append",
        default=None,
        metavar="DIR",
        help="a folder requests may write to (repeatable; default: .)",
    )
    serve.add_argument(
        "--api-key-file",
        default=None,
        help="every request must carry the key in this file's first line",
    )
    serve.add_argument("--max-body-bytes", type=int, default=defaults["max_body_bytes"])
    serve.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    serve.set_defaults(wait_max_seconds=float(defaults["wait_max_seconds"]))


def run_server(args: argparse.Namespace, workspace: Workspace) -> None:
    import uvicorn

    from trainer.server.api import Service, create_app
    from trainer.server.guard import Guard, PathRoots, is_loopback, read_api_key
    from trainer.server.trainings import checked
    from trainer.store.catalog import Catalog

    api_key = read_api_key(args.api_key_file)
    if not is_loopback(args.host) and api_key is None:
        raise UserError(
            f"--host {args.host} is reachable from other machines: give "
            "--api-key-file too, or serve on 127.0.0.1"
        )
    if args.max_body_bytes < 1024:
        raise UserError(f"--max-body-bytes {args.max_body_bytes}: give 1024 or more")
    # The store of --tracking-uri and --experiment is every request's: the trainings' configs
    # composed here and the processes started here read it from these variables.
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    os.environ["MLFLOW_EXPERIMENT_NAME"] = args.experiment
    workspace = Workspace(home=workspace.home, tracking_uri=args.tracking_uri,
                          experiment_name=args.experiment)  # fmt: skip
    checked(args.overrides, [])  # the trainings' defaults, refused now rather than per request
    roots = PathRoots(args.data_root or ["."], args.output_root or ["."])
    catalog = Catalog(args.tracking_uri, args.experiment)
    service = Service(
        catalog,
        workspace,
        roots,
        list(args.overrides),
        Path("runs/serve").resolve(),
        args.wait_max_seconds,
    )
    threading.Thread(target=service.settle_forever, name="settle", daemon=True).start()
    threading.Thread(target=_restore_deployments, args=(catalog, workspace), name="restore",
                     daemon=True).start()  # fmt: skip
    app = Guard(create_app(service), api_key, args.max_body_bytes)
    listening = _bound_socket(args.host, args.port)
    host, port = listening.getsockname()[:2]
    print(f"http://{host}:{port}", flush=True)  # the first line: where to point a client
    print(
        f"serving AutoML's API on http://{host}:{port} over {redact(args.tracking_uri)}; "
        f"reads under {', '.join(map(str, roots.data))}, writes under "
        f"{', '.join(map(str, roots.output))}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[listening])


def _restore_deployments(catalog: Any, workspace: Workspace) -> None:
    """Every model on record as deployed answers again: its server is started where it is gone
    (models stay deployed across a restart, as AutoML's do)."""
    from trainer.serving.deployments import restore

    try:
        restarted = restore(catalog, workspace)
    except Exception as error:  # the server answers all the same; predict says UNAVAILABLE
        print(f"deployed models not restored: {redact(str(error))}", file=sys.stderr, flush=True)
        return
    if restarted:
        print(f"deployed again: {', '.join(restarted)}", file=sys.stderr, flush=True)


def _bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    listening.listen(128)
    return listening
