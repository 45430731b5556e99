"""A sweep's trials as SLURM jobs, through submitit (``sweep.executor=slurm``), or through
submitit's local executor (``submitit_local``: the same path, run on this machine).

Each job runs the trial's ``python -m trainer`` command as it is; its output lands in
``<sweep>/submitit/``. The sweep polls the job like a local process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SubmittedTrial:
    """A submitit job seen as the sweep sees a process: ``poll()`` is None while it runs."""

    pid = None

    def __init__(self, job: Any) -> None:
        self.job = job

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        return 0 if self.job.exception() is None else 1


def submit(
    command: list[str], env: dict[str, str], trial: Any, folder: Path, settings: Any, cwd: str
) -> SubmittedTrial:
    import submitit

    cluster = "local" if settings.executor == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=folder / "submitit", cluster=cluster)
    slurm = settings.slurm
    executor.update_parameters(
        name=f"{folder.name}-{trial.number}", timeout_min=int(slurm.get("time_minutes") or 120)
    )
    if cluster == "slurm":
        executor.update_parameters(
            slurm_partition=slurm.get("partition"),
            gpus_per_node=int(slurm.get("gpus_per_node") or settings.gpus_per_trial or 0),
            cpus_per_task=int(slurm.get("cpus_per_task") or 1),
        )
    job = executor.submit(submitit.helpers.CommandFunction(command, cwd=cwd, env=env))
    return SubmittedTrial(job)
