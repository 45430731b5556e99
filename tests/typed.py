"""Typed settings for tests that call the code below the entry point directly.

The code takes ``trainer.settings`` types, every key set; a test names the values it is about
and these helpers fill the rest: from conf/ (``settings``), or, for the tests written when the
code read a missing key with a default of its own, with that default (``early_stopping``,
``budget``), so that each test still means what it meant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainer.settings import (
    BudgetSettings,
    EarlyStoppingSettings,
    Settings,
    composed,
    deep_merge,
)


def settings(
    task: str = "image_classification", model_type: str = "default", **sections: Any
) -> Settings:
    """conf/ composed for ``task`` and ``model_type``, ``sections`` (``model={...}``) on top."""
    return Settings.parse(deep_merge(composed(task, model_type), sections))


def early_stopping(values: Mapping[str, Any]) -> EarlyStoppingSettings:
    unset = {
        "smoothing_window": 1,
        "lr_drop_patience": None,
        "lr_drop_factor": 0.2,
        "lr_drops": 1,
        "min_patience_steps": 0,
        "patience_before_first_gain": None,
        "anneal_before_stopping": False,
        "min_delta": 0.0,
    }
    return EarlyStoppingSettings.model_validate({**unset, **values})


def budget(values: Mapping[str, Any]) -> BudgetSettings:
    unset = {
        "min_milli_node_hours": 1,
        "max_milli_node_hours": 100_000,
        "train_budget_milli_node_hours": 1_000,
        "disable_early_stopping": False,
        "save_reserve_first_seconds": 6.0,
        "save_reserve_first_mb_per_second": 25.0,
        "save_reserve_factor": 1.5,
        "save_reserve_floor_seconds": 1.0,
    }
    return BudgetSettings.model_validate({**unset, **values})
