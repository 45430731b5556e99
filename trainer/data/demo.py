"""Generated demo datasets, written once under the home and shared by every later run.

Each task's demo is generated on first use rather than shipped, so the repository stays small;
the same seed always draws the same data, so the dataset fingerprint is stable across machines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def generate_once(target: Path, ready: Path, write: Callable[[Path], object]) -> None:
    """Make ``target`` with ``write(folder)`` unless ``ready`` (a file or folder inside it, or
    ``target`` itself) exists. Written aside and renamed, so an interrupted generation never
    leaves half a dataset, and two processes racing leave one whole one."""
    if ready.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not ready.exists():  # another process won the race otherwise
            raise
