"""A sweep's trials as SLURM jobs, through submitit (``sweep.executor=slurm``), or through
submitit's local executor (``submitit_local``: the same path, run on this machine).

Each job runs the trial's ``python -m trainer`` command as it is; its output lands in
``<sweep>/submitit/``. The sweep polls the job like a local process.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import submitit


class SubmittedTrial:
    """A submitit job seen as the sweep sees a process: ``poll()`` is None while it runs."""

    pid = None

    def __init__(self, job: submitit.Job[Any]) -> None:
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        return 0 if self.job.exception() is None else 1


def submit(
    command: list[str],
    env: dict[str, str],
    cwd: str,
    folder: Path,
    name: str,
    executor: str,
    slurm: dict[str, Any],
    gpus_per_trial: int,
) -> SubmittedTrial:
    """Submit ``command`` as job ``name``, its files in ``folder``, with the sweep's
    ``executor`` and ``sweep.slurm`` settings."""
    import submitit

    cluster = "local" if executor == "submitit_local" else "slurm"
    jobs = submitit.AutoExecutor(folder=folder, cluster=cluster)
    jobs.update_parameters(name=name, timeout_min=int(slurm.get("time_minutes") or 120))
    if cluster == "slurm":
        jobs.update_parameters(
            slurm_partition=slurm.get("partition"),
            gpus_per_node=int(slurm.get("gpus_per_node") or gpus_per_trial or 0),
            cpus_per_task=int(slurm.get("cpus_per_task") or 1),
        )
    job = jobs.submit(submitit.helpers.CommandFunction(command, cwd=cwd, env=env))
    return SubmittedTrial(job)
