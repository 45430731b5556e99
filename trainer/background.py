"""A verb or a training started as a background process of its own: what `detach=true` does,
and what the API server does for every long-running operation it starts.

The process gets its own session (it outlives the terminal or the server that started it, and
their Ctrl-C or SIGTERM) and writes its output to a log file, never to a pipe: a pipe's reader
that goes away would end the process with it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from trainer.job.ids import MODEL_ID_ENV, OPERATION_ID_ENV
from trainer.sweep.space import override_literal


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


def start_training(
    overrides: Sequence[str],
    run_dir: Path,
    environment: Mapping[str, str],
    ids: tuple[str, str] | None = None,
) -> tuple[subprocess.Popen, Path]:
    """`python -m trainer OVERRIDES` in ``run_dir`` as a process of its own, told the operation
    and model ``ids`` its launcher chose and answered with (none: a resume, whose operation has
    its own); the process and its log, ``run_dir/train.log``."""
    command = trainer_command(*overrides, f"hydra.run.dir={override_literal(str(run_dir))}")
    told = dict(environment)
    if ids is not None:
        told.update({OPERATION_ID_ENV: ids[0], MODEL_ID_ENV: ids[1]})
    log = run_dir / "train.log"
    return start_in_background(command, log, told), log
