"""Milli-node-hour accounting: the meter, the bounds check and the stopping callback.

Knows nothing of torchvision, MLflow or the ``trainer`` package.
"""

from budgets.bounds import BudgetBounds, BudgetOutOfBounds, check_budget
from budgets.meter import SECONDS_PER_MILLI_NODE_HOUR, BudgetMeter, WorkEstimator

__all__ = [
    "SECONDS_PER_MILLI_NODE_HOUR",
    "BudgetBounds",
    "BudgetMeter",
    "BudgetOutOfBounds",
    "WorkEstimator",
    "check_budget",
]
