"""What a batch-prediction input may ask of this machine: the one gate between a CSV written
elsewhere and this machine's files and network.

- A local path (absolute, ``~``-relative or relative to the CSV's folder) or a ``file:`` URL is
  read when it names a regular file. A FIFO, a device, a socket, a folder, or anything under
  /dev, /proc or /sys is refused: a FIFO or ``/dev/stdin`` would block the job until someone
  writes to it, ``/dev/zero`` never ends.
- ``http``, ``https``, ``gs`` and ``s3`` (videos: ``http`` and ``https``, what FFmpeg reads) are
  read only with ``predict --allow-remote``, every read with a connect and a read timeout
  (``remote_timeout_seconds``, conf/predict.yaml).
- Any other scheme is refused: FFmpeg's ``tcp:``, ``udp:``, ``rtmp:``, ``concat:``, ``pipe:``,
  ``sftp:``..., fsspec's other file systems and its chained ``a::b`` URLs.

A refused row fails alone, with its error row; the job goes on. The limits of a whole input
(rows per file, ``--workers``) are conf/predict.yaml's, checked before the operation starts.
No torch here: the verb checks its input before loading a model.
"""

from __future__ import annotations

import csv
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from trainer import CONF_DIR
from trainer.data.manifest import resolve_path
from trainer.errors import UserError
from trainer.store.automl import RpcCode

# RFC 3986's scheme: what fsspec and FFmpeg read as a protocol name before the colon.
SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
IMAGE_SCHEMES = ("http", "https", "gs", "s3")
VIDEO_SCHEMES = ("http", "https")
PSEUDO_FILE_SYSTEMS = (Path("/dev"), Path("/proc"), Path("/sys"))
# The protocols FFmpeg may open for one source, nested ones included (a playlist, a redirect):
# a local file cannot pull in a network URL, a URL cannot read local files.
LOCAL_PROTOCOLS = "file"
REMOTE_PROTOCOLS = "http,https,tcp,tls"
LIMITS_FILE = CONF_DIR / "predict.yaml"
LIMITS_NAME = "conf/predict.yaml"  # as messages name it
FILE_KINDS = [
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
]


@dataclass(frozen=True)
class SourcePolicy:
    """How rows are read: local files only (the default), or remote URLs too, each read given
    ``remote_timeout_seconds`` to connect and then for each piece of data."""

    remote_timeout_seconds: float | None = None

    @property
    def allows_remote(self) -> bool:
        return self.remote_timeout_seconds is not None


LOCAL_ONLY = SourcePolicy()


class Refused(Exception):
    """A row this machine does not read; the message is its error row's."""

    def __init__(self, code: RpcCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- one row ------------------------------------------------------------------------------


def checked_source(
    row: str, base: Path, policy: SourcePolicy, remote: tuple[str, ...]
) -> Path | str:
    """The regular file (resolved) or the allowed URL that ``row`` names.

    Raises Refused, or FileNotFoundError for a local file that does not exist.
    """
    found = SCHEME.match(row)
    if found is None:
        return regular_file(resolve_path(row, base), row)
    scheme = found.group(1).lower()
    if scheme == "file":
        return regular_file(file_url_path(row, base), row)
    if "::" in row:  # fsspec's chain a::b: each link may name any protocol
        raise Refused(RpcCode.INVALID_ARGUMENT, f"{row}: chained URLs (a::b) are not read")
    if scheme not in remote:
        allowed = f"{', '.join(remote[:-1])} or {remote[-1]}"
        raise Refused(
            RpcCode.INVALID_ARGUMENT,
            f"{row}: {scheme}: inputs are not read; use a local path, or {allowed} with "
            "--allow-remote",
        )
    if not policy.allows_remote:
        raise Refused(
            RpcCode.PERMISSION_DENIED, f"{row}: {scheme} inputs are read only with --allow-remote"
        )
    return row


def file_url_path(row: str, base: Path) -> Path:
    """The path of a ``file:`` URL on this machine (``file:///a/b.png``; no other host)."""
    parts = urlsplit(row)
    if parts.netloc not in ("", "localhost"):
        raise Refused(
            RpcCode.INVALID_ARGUMENT, f"{row}: a file URL on host {parts.netloc!r} is not read"
        )
    return resolve_path(unquote(parts.path), base)


def regular_file(path: Path, row: str) -> Path:
    """``path`` resolved, if it is a regular file outside the pseudo file systems."""
    real = Path(os.path.realpath(path))
    for seen in (Path(os.path.abspath(path)), real):  # /dev/stdin leads to /proc/self/fd/0
        if any(seen.is_relative_to(system) for system in PSEUDO_FILE_SYSTEMS):
            raise Refused(
                RpcCode.INVALID_ARGUMENT, f"{row}: files under /{seen.parts[1]} are not read"
            )
    refuse_unless_regular(os.stat(real).st_mode, row)
    return real


def refuse_unless_regular(mode: int, row: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in FILE_KINDS if test(mode)), "not a file")
        raise Refused(RpcCode.INVALID_ARGUMENT, f"{row}: {kind}, not a regular file: not read")


def open_image_input(row: str, base: Path, policy: SourcePolicy) -> BinaryIO:
    """A row's bytes: a regular local file, or an allowed URL through fsspec with timeouts."""
    source = checked_source(row, base, policy, IMAGE_SCHEMES)
    if isinstance(source, Path):
        return open_regular(source, row)
    assert policy.remote_timeout_seconds is not None
    import fsspec

    options = fsspec_options(source, policy.remote_timeout_seconds)
    return fsspec.open(source, "rb", **options).open()


def open_regular(path: Path, row: str) -> BinaryIO:
    """Opened without blocking and checked again on the descriptor: a FIFO put in the file's
    place after the check would otherwise block the open until someone writes to it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        refuse_unless_regular(os.fstat(fd).st_mode, row)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def fsspec_options(url: str, seconds: float) -> dict[str, Any]:
    """Each file system's own way to bound the wait to connect and for each read."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "s3":  # s3fs hands config_kwargs to botocore's Config
        return {"config_kwargs": {"connect_timeout": seconds, "read_timeout": seconds}}
    import aiohttp  # http and gs (gcsfs) read through aiohttp sessions

    wait = aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)
    return {"session_kwargs" if scheme == "gs" else "client_kwargs": {"timeout": wait}}


def ffmpeg_open_arguments(source: Path | str, policy: SourcePolicy) -> dict[str, Any]:
    """``av.open``'s keyword arguments for a checked source: the protocols FFmpeg may open for
    it, and for a URL PyAV's timeout (to open, then for each read) and FFmpeg's own."""
    if isinstance(source, Path) or policy.remote_timeout_seconds is None:
        return {"container_options": {"protocol_whitelist": LOCAL_PROTOCOLS}}
    seconds = policy.remote_timeout_seconds
    options = {"protocol_whitelist": REMOTE_PROTOCOLS, "rw_timeout": str(int(seconds * 1e6))}
    return {"container_options": options, "timeout": (seconds, seconds)}


def is_timeout(error: BaseException | None) -> bool:
    """Whether a remote read waited too long, anywhere along the chain of causes: fsspec's http
    raises FileNotFoundError from aiohttp's timeout, PyAV's timeout interrupts FFmpeg (ExitError),
    botocore's errors are named ``...Timeout...``."""
    while error is not None:
        named = type(error).__name__
        if isinstance(error, TimeoutError) or "Timeout" in named or named == "ExitError":
            return True
        error = error.__cause__
    return False


# -- a whole input ------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictionLimits:
    """conf/predict.yaml: what one prediction input may ask."""

    max_rows: int
    max_workers: int
    remote_timeout_seconds: float


def prediction_limits(path: Path = LIMITS_FILE) -> PredictionLimits:
    """conf/predict.yaml resolved (its environment variables), each value checked."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(config, dict)
    return PredictionLimits(
        max_rows=int(_at_least(config, "max_rows", 1)),
        max_workers=int(_at_least(config, "max_workers", 0)),
        remote_timeout_seconds=_at_least(config, "remote_timeout_seconds", 0.001),
    )


def _at_least(config: dict[Any, Any], key: str, least: float) -> float:
    value = config.get(key)
    try:
        found = float(str(value))
    except ValueError:
        found = math.nan
    whole = isinstance(least, int)
    if not (found >= least and math.isfinite(found)) or (whole and not found.is_integer()):
        kind = "a whole number" if whole else "a number"
        raise UserError(f"{key}={value!r} in {LIMITS_NAME} must be {kind} >= {least}")
    return found


def check_workers(workers: int, limits: PredictionLimits) -> None:
    if not 0 <= workers <= limits.max_workers:
        raise UserError(
            f"--workers {workers} must be between 0 (decode in the main process) and "
            f"{limits.max_workers} (max_workers in {LIMITS_NAME})"
        )


def check_row_count(path: Path, limits: PredictionLimits) -> None:
    """Refuse an input of more than ``max_rows`` rows, counted as the readers count them (blank
    lines skipped) without holding the file: a longer one stops the count."""
    rows = 0
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        try:
            for cells in csv.reader(handle):
                rows += any(cell.strip() for cell in cells)
                if rows > limits.max_rows:
                    raise UserError(
                        f"--input {path} holds more than {limits.max_rows} rows, the most one "
                        f"prediction reads (max_rows in {LIMITS_NAME}); split it"
                    )
        except csv.Error:
            return  # malformed: the task's reader says where
