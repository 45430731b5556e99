"""Hydra's plugin for ``hydra/sweeper=budgeted``: the sweep of trainer/sweep/ under one budget.

Hydra finds sweepers in the ``hydra_plugins`` namespace package. This one does not hand its
trials to Hydra's launcher, which runs a batch of jobs and returns when the slowest has ended:
a sweep under a budget starts each trial, or promotes one, as soon as a slot and the ledger
allow, and each trial is a ``python -m trainer`` process of its own (an operation that a
promotion resumes, that ``operations cancel`` stops, and that survives the sweep's process).
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class BudgetedSweeper(Sweeper):
    def __init__(self) -> None:
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config

    def sweep(self, arguments: list[str]) -> Any:
        from trainer.app import errors_reported
        from trainer.sweep.runner import start_sweep

        assert self.config is not None
        choices = OmegaConf.to_container(self.config.hydra.runtime.choices)
        assert isinstance(choices, dict)  # Hydra's group -> chosen option
        with errors_reported():
            return start_sweep(self.config, arguments, {str(k): v for k, v in choices.items()})
