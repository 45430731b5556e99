"""Budget bounds: a budget outside [min, max] is refused before any work."""

from __future__ import annotations

from dataclasses import dataclass


class BudgetOutOfBounds(ValueError):
    """A user's budget that the bounds refuse; the message names the bounds and the override."""


@dataclass(frozen=True)
class BudgetBounds:
    min_milli_node_hours: int
    max_milli_node_hours: int


def _as_int(name: str, value: object) -> int:
    # bool is an int subclass; a budget of "true" is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BudgetOutOfBounds(
            f"budget.{name}={value!r} is not an integer number of milli-node-hours; "
            f"give a whole number, e.g. budget.{name}=24000"
        )
    return value


def check_budget(budget: object, bounds_min: object, bounds_max: object) -> int:
    """Return the budget as an int, or raise BudgetOutOfBounds with a one-line fix."""
    budget = _as_int("train_budget_milli_node_hours", budget)
    low = _as_int("min_milli_node_hours", bounds_min)
    high = _as_int("max_milli_node_hours", bounds_max)
    if low < 1 or high < low:
        raise BudgetOutOfBounds(
            f"budget bounds [{low}, {high}] are not a valid range; "
            "budget.min_milli_node_hours must be >= 1 and <= budget.max_milli_node_hours"
        )
    if not low <= budget <= high:
        raise BudgetOutOfBounds(
            f"budget.train_budget_milli_node_hours={budget} is outside the bounds [{low}, {high}] "
            "for this model type; choose a budget within them, or override the bounds with "
            "budget.min_milli_node_hours=... budget.max_milli_node_hours=..."
        )
    return budget
