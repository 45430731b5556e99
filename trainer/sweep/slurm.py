"""A sweep's trials as SLURM jobs, through submitit (``sweep.executor=slurm``), or through
submitit's local executor (``submitit_local``: the same path, run on this machine).

Each job runs the trial's ``python -m trainer`` command as it is; its output lands in
``<sweep>/submitit/``. The sweep polls the job like a local process.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import submitit


class SubmittedTrial:
    """A submitit job seen as the sweep sees a process: ``poll()`` is None while it runs."""

    pid = None

    def __init__(self, job: submitit.Job[Any]) -> None:
        self.job = job
        self.job_id = str(job.job_id)  # SLURM's, or the local executor's controller pid

    def poll(self) -> int | None:
        if not self.job.done():
            return None
        return 0 if self.job.exception() is None else 1


def submit(
    command: list[str],
    told: dict[str, str],
    cwd: str,
    folder: Path,
    name: str,
    executor: str,
    slurm: dict[str, Any],
    gpus_per_trial: int,
) -> SubmittedTrial:
    """Submit ``command`` as job ``name``, its files in ``folder``, with the sweep's
    ``executor`` and ``sweep.slurm`` settings; ``told``: the variables it adds to the
    environment it inherits."""
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
    job = jobs.submit(TrialCommand(command, cwd, told))
    return SubmittedTrial(job)


@dataclass(frozen=True)
class TrialCommand:
    """What submitit pickles into the job's folder and runs there: the command, and only the
    variables the trial is told beyond the environment the job inherits from the sweep (sbatch
    exports it; the local executor passes it on). submitit's own CommandFunction takes the
    whole environment, which would put every secret in it into that pickle."""

    command: list[str]
    cwd: str
    told: dict[str, str]

    def __call__(self) -> None:
        subprocess.run(self.command, cwd=self.cwd, env={**os.environ, **self.told}, check=True)
