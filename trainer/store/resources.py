"""IDs, names, times and atomic JSON files of the resources (automl.py: their AutoML shapes);
the checks that values read back from the store get, and the redaction of credentials."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from trainer import CONF_DIR
from trainer.errors import UserError

ID_PATTERN = re.compile(r"^[A-Z]{3}[1-9][0-9]{18}$")
SPENT_SECONDS = "spent_seconds"  # run tag: a training's cost on record, in seconds
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,32}$")  # AutoML's rule for labels and display names


def new_id(prefix: str) -> str:
    """An AutoML-style ID: the task's prefix and 19 random digits."""
    return f"{prefix}{secrets.randbelow(9 * 10**18) + 10**18}"


def check_name(kind: str, value: str) -> str:
    if not NAME_PATTERN.match(value):
        raise UserError(
            f"{kind} {value!r} is invalid: use 1 to 32 ASCII letters, digits or underscores"
        )
    return value


def check_id(value: Any, what: str = "ID") -> str:
    """An ID read from a user or from the store, as ``new_id`` makes them: it names folders and
    becomes part of queries, so anything else is refused."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise UserError(f"{what} {str(value)[:80]!r} is not an ID such as ICN1234567890123456789")
    return value


def stored_labels(text: str) -> list[str]:
    """A model's labels as its ``labels`` tag holds them (a JSON list), checked as a dataset's
    labels are: they name output files and folders."""
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(label, str) and NAME_PATTERN.match(label) for label in labels)
    ):
        raise UserError(f"the model's stored labels {text[:80]!r} are not a list of label names")
    return labels


def downloads(home: str | Path, key: str) -> Path:
    """Where artifacts fetched from the store for ``key`` (a model's or run's ID) are kept:
    under the home, not in whatever folder a verb or a training was started from."""
    return Path(home) / "downloads" / check_id(key)


def open_lock(path: Path) -> int:
    """A lock file's descriptor, for flock: created 0600 where missing, never opened through a
    symbolic link (O_NOFOLLOW) and never truncated on opening, and refused unless it is a file
    of its own: a link planted in a shared folder would have us write to what it points at."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        raise UserError(f"{path} is a symbolic link: a lock file must be a file of its own; "
                        "remove it") from None  # fmt: skip
    found = os.fstat(handle)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        os.close(handle)
        raise UserError(f"{path} is not a lock file of its own (a link to another file, or not "
                        "a file); remove it")  # fmt: skip
    return handle


def fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable: a crash right after it must not undo it."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks (checkpoints run to hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# Read once, at import: setting the umask to read it is not safe while other threads create files.
UMASK = _read_umask()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str, what: str = "the time") -> datetime:
    """The inverse of ``utc_now``: an RFC 3339 timestamp as an aware datetime. Times are read
    back from the store, which anyone with access may write: one without a time zone (which
    cannot be compared with now) or garbage is a one-line error that names ``what`` it is."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, TypeError, ValueError):
        moment = None
    if moment is None or moment.tzinfo is None:
        raise UserError(
            f"{what} {str(text)[:40]!r} is not an RFC 3339 time with a time zone, such as "
            "2026-01-31T09:00:00.000000Z"
        )
    return moment


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


def expired_on(tags: dict[str, str], owner: str = "the model") -> str | None:
    """A registered model's expiry time when it has passed (its ``expire_time`` tag), else None;
    ``owner`` names the model in the error a bad tag gives."""
    expire = tags.get("expire_time") or _term_end(tags, owner)
    moment = parse_time(expire, f"{owner}'s expire_time tag") if expire else None
    return expire if moment and moment < datetime.now(timezone.utc) else None


def _term_end(tags: dict[str, str], owner: str) -> str | None:
    """A model recorded without an expiry time expires as its task's models do: its creation
    plus ``model_lifespan_months`` (conf/task/<task>.yaml). A missing tag is not "never"."""
    created, task = tags.get("create_time"), str(tags.get("task", ""))
    lifespans = CONF_DIR / "task" / f"{task}.yaml"
    if not created or not re.fullmatch(r"[a-z_]+", task) or not lifespans.is_file():
        return None  # nothing to count from: not one of this project's models
    from omegaconf import OmegaConf

    parse_time(created, f"{owner}'s create_time tag")
    return add_months(created, int(OmegaConf.load(lifespans).model_lifespan_months))


def write_json_atomic(path: Path, data: Any, indent: int | None = 2, private: bool = False) -> None:
    """Write to a temporary file beside ``path`` and rename, so a reader never sees half a file;
    the file gets the permissions an ordinary write would, or with ``private`` (a file that
    holds a configuration, which may name more than it should) mkstemp's own: 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=indent)
            out.write("\n")
            out.flush()
            if not private:
                os.fchmod(out.fileno(), 0o666 & ~UMASK)
            os.fsync(out.fileno())
        os.replace(temp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
