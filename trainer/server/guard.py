"""What keeps the server safe to run: the API key, the request size limit, and the folders a
request may read from and write to."""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from trainer.errors import UserError
from trainer.server.errors import ApiError, error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
OPEN_PATHS = ("/health",)  # readiness, for a load balancer: it tells nothing about the store


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: str | None) -> str | None:
    """The key in ``--api-key-file`` (its first line); a missing or empty file is refused."""
    if path is None:
        return None
    try:
        key = Path(path).read_text().strip().splitlines()[0].strip() if path else ""
    except (OSError, IndexError):
        key = ""
    if len(key) < 16:
        raise UserError(f"--api-key-file {path}: give a file whose first line is a key of 16 or "
                        "more characters")  # fmt: skip
    return key


async def _answer(send: Send, status: str, message: str, http_status: int | None = None) -> None:
    code, error = error_body(status, message, http_status)
    body = json.dumps(error).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware, before any route: the key (when the server has one), then the body's
    size, both answered as Google's errors. Written against ASGI itself because Starlette's
    request-body middleware reads the whole body before anything can refuse it."""

    def __init__(self, app: App, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key and scope["path"] not in OPEN_PATHS and not self._has_key(scope):
            await _answer(send, "UNAUTHENTICATED", "this server needs its API key: send it as "
                          "x-goog-api-key or Authorization: Bearer")  # fmt: skip
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            await self._too_large(send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _has_key(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-goog-api-key", b"").decode("latin-1")
        bearer = headers.get(b"authorization", b"").decode("latin-1")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        if not given:  # Google's APIs also take ?key=
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("key", [""])[0]
        assert self.api_key is not None
        # Constant time: how much of a guess matched must not show in how long it took.
        return hmac.compare_digest(given.encode("utf-8"), self.api_key.encode("utf-8"))

    async def _too_large(self, send: Send) -> None:
        await _answer(send, "RESOURCE_EXHAUSTED",
                      f"the request body is over the server's {self.max_body_bytes} bytes",
                      http_status=413)  # fmt: skip

    def _bounded(self, receive: Receive) -> Receive:
        """A body sent in chunks (no honest Content-Length) is counted as it arrives."""
        seen = 0

        async def bounded() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise ApiError("RESOURCE_EXHAUSTED", "the request body is over the limit", 413)
            return message

        return bounded


class PathRoots:
    """The folders a request's paths must resolve inside, symlinks followed: ``--data-root``
    for what it reads, ``--output-root`` for what it writes."""

    def __init__(self, data: Sequence[str], output: Sequence[str]) -> None:
        self.data = [Path(root).expanduser().resolve() for root in data]
        self.output = [Path(root).expanduser().resolve() for root in output]

    def readable(self, uri: str, what: str) -> Path:
        return self._inside(uri, self.data, what, "--data-root")

    def writable(self, uri: str, what: str) -> Path:
        return self._inside(uri, self.output, what, "--output-root")

    @staticmethod
    def _inside(uri: str, roots: list[Path], what: str, flag: str) -> Path:
        path = local_path(uri, what)
        resolved = path.resolve()  # every symlink on the way, and .., taken
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            shown = ", ".join(str(root) for root in roots) or "none given"
            raise ApiError("PERMISSION_DENIED",
                           f"{what} {uri!r} is outside the server's {flag} ({shown})")  # fmt: skip
        return resolved


def local_path(uri: str, what: str) -> Path:
    """A local path or ``file://`` URI; ``gs://`` and the like are not reachable here."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ApiError("INVALID_ARGUMENT", f"{what} {uri!r}: a file:// URI names no host here")
        return Path(unquote(parsed.path))
    if parsed.scheme or not uri:
        raise ApiError("INVALID_ARGUMENT",
                       f"{what} {uri!r}: give a local path or a file:// URI on the server's "
                       "machine (this server reaches no bucket)")  # fmt: skip
    return Path(uri).expanduser()
