"""Whether a sweep or a trial still runs, told by more than a pid (a pid is reused once its
process has ended): a sweep by a lock its process holds for as long as it lives, a trial by its
pid together with the time that process started, a SLURM trial by its job ID in the queue.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from trainer.errors import UserError
from trainer.store.resources import open_lock

LOCK_NAME = "sweep.lock"
_HELD: dict[Path, int] = {}  # the sweeps this process runs, and their locks' descriptors


def hold_sweep(folder: Path) -> None:
    """One process per sweep: this one, for as long as it lives (the lock goes with it, however
    it ends). A second ``sweeps resume`` of a running sweep is refused here."""
    folder = folder.resolve()
    if folder in _HELD:
        return
    handle = open_lock(folder / LOCK_NAME)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise UserError(
            f"sweep {folder.name} is running in another process: wait for it, or stop it with "
            f"python -m trainer sweeps cancel {folder.name}"
        ) from None
    _HELD[folder] = handle


def sweep_running(folder: Path, pid: int | None) -> bool:
    """Whether a process runs the sweep: one holds its lock (a sweep started before the lock
    existed: its ``pid`` is alive)."""
    folder = folder.resolve()
    if folder in _HELD:
        return True
    if not (folder / LOCK_NAME).is_file():
        return process_alive(pid)
    return _locked_elsewhere(folder / LOCK_NAME)


def process_alive(pid: int | None, started: int | None = None) -> bool:
    """Whether process ``pid`` runs (a zombie does not), and, where ``started`` is known, is the
    one that started then and not a later one given the same pid."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc (not Linux): the pid is all there is
    return fields[0] != "Z" and (started is None or int(fields[19]) == started)


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (/proc/PID/stat's 22nd field):
    with the pid, what tells it from a later process given the same pid."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def slurm_job_queued(job_id: str) -> bool:
    """Whether SLURM still has the job, pending or running (squeue forgets it once it ends)."""
    try:
        listed = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"],
                                capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False  # no SLURM here (submitit's local executor): the run directory tells
    return listed.returncode == 0 and bool(listed.stdout.strip())


def run_dir_held(run_dir: Path) -> bool:
    """Whether a training holds the run directory's lock (trainer/job/run_state.py)."""
    lock = run_dir / ".lock"
    return lock.is_file() and _locked_elsewhere(lock)


def _locked_elsewhere(path: Path) -> bool:
    handle = open_lock(path)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(handle)  # releases it at once, where it was ours to take
    return False


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command's name (the state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
