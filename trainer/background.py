"""A verb or a training started as a background process of its own: what `detach=true` does,
and what the API server does for every long-running operation it starts.

The process gets its own session (it outlives the terminal or the server that started it, and
their Ctrl-C or SIGTERM) and writes its output to a log file, never to a pipe: a pipe's reader
that goes away would end the process with it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def trainer_command(*arguments: str) -> list[str]:
    """`python -m trainer ...` with this interpreter."""
    return [sys.executable, "-m", "trainer", *arguments]


def start_in_background(
    command: list[str], log_file: Path, environment: Mapping[str, str]
) -> subprocess.Popen:
    """Start ``command`` in a session of its own, its output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(environment),
            start_new_session=True,
        )
