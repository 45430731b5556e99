"""A training that SLURM requeues goes on as the same operation, within the same budget.

On a cluster a job is preempted (SLURM sends SIGTERM, then kills it after the partition's grace
time) or reaches its time limit (submitted with ``--signal=USR1@120``, it gets SIGUSR1 that many
seconds before). Either way the training writes its checkpoint and cost and ends INTERRUPTED
(``checkpoints.StopRequest``). On SIGUSR1 it asks SLURM to requeue the job (``scontrol
requeue``); a preempted job submitted with ``--requeue`` is requeued by SLURM itself.

A requeued job runs its script again, with the same job ID and ``SLURM_RESTART_COUNT`` raised.
The operation that the same command started in that job is found in ``<home>/slurm/`` (keyed by
cluster, job ID and the command's overrides, as one script may run several trainings): an
interrupted one is resumed, so its earlier cost counts against the one budget; a finished one is
not trained again.

Lightning has a SLURM requeue of its own (``SLURMEnvironment(auto_requeue=True)``): it saves an
``hpc_ckpt`` and requeues, but knows nothing of the operation or its cost. Its SIGUSR1 handler
is replaced by ours when training starts, as Lightning's SIGTERM handler is.

Light: no torch at import (the entry point asks before any training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from trainer.store.resources import write_json_atomic

log = logging.getLogger("trainer")

REQUEUE_SIGNAL = "SIGUSR1"  # what `sbatch --signal=USR1@SECONDS` sends before the time limit
FINISHED = ("SUCCEEDED", "CANCELLED")


def job_key(overrides: list[str]) -> str | None:
    """This command's key within its SLURM job, or None outside SLURM."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    cluster = os.environ.get("SLURM_CLUSTER_NAME", "slurm")
    command = "\0".join(sorted(overrides))
    return f"{cluster}-{job_id}-{hashlib.sha256(command.encode()).hexdigest()[:12]}"


def _binding(home: str | Path, key: str) -> Path:
    return Path(home) / "slurm" / f"{key}.json"


def bind(home: str | Path, key: str | None, operation_name: str, run_dir: Path) -> None:
    """Remember which operation this command of this SLURM job is, for a requeued run."""
    if key is not None:
        record = {"operation": operation_name, "run_dir": str(run_dir.resolve())}
        write_json_atomic(_binding(home, key), record)


def requeued_operation(home: str | Path, key: str | None) -> tuple[str, str] | None:
    """In a requeued SLURM job: the operation that this command started before, and its
    status; None in a job's first run or outside SLURM."""
    if key is None or int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    path = _binding(home, key)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    state = Path(record["run_dir"]) / "state.json"
    status = json.loads(state.read_text()).get("status", "") if state.is_file() else ""
    return record["operation"], status


def requeue() -> None:
    """Ask SLURM to put this job back in the queue; it runs again from its script's start."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log.warning("scontrol not found: resubmit SLURM job %s to resume the training", job_id)
        return
    done = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        log.warning("SLURM job %s requeued: it resumes this operation when it runs", job_id)
    else:
        log.warning("scontrol requeue %s failed (%s): resubmit the job to resume the training",
                    job_id, done.stderr.strip()[:200])  # fmt: skip
