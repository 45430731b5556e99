"""Successive halving in milli-node-hours, asynchronous (ASHA, Li et al. 2020): rungs are budgets,
and a trial paused at a rung is promoted as soon as it ranks in the best 1/factor of the results
that rung has seen so far. No rung waits for a batch of trials to end: a free slot goes to a
promotion when one is due, to a new trial otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.errors import UserError


def rung_budgets(minimum: int, factor: int, maximum: int, pruning: str) -> list[int]:
    """The cumulative budget of each rung: minimum x factor^k up to maximum (which ends the
    list, a shorter last step if need be); one rung of maximum without pruning."""
    if pruning == "none":
        return [maximum]
    if pruning != "successive_halving":
        raise UserError(f"sweep.pruning={pruning!r}: use successive_halving or none")
    if factor < 2:
        raise UserError(f"sweep.reduction_factor={factor} must be at least 2")
    budgets = [minimum]
    while budgets[-1] * factor <= maximum:
        budgets.append(budgets[-1] * factor)
    if budgets[-1] < maximum:
        budgets.append(maximum)
    return budgets


@dataclass(frozen=True)
class RungResult:
    trial: int
    value: float


def promotable(
    results: Sequence[RungResult], candidates: Sequence[int], factor: int, maximize: bool
) -> list[int]:
    """Of the ``candidates`` (trials paused at this rung), those in the best
    ``len(results) // factor`` of the rung's ``results``, best first."""
    ranked = sorted(results, key=lambda r: r.value, reverse=maximize)
    top = {r.trial for r in ranked[: len(ranked) // factor]}
    return [r.trial for r in ranked if r.trial in top and r.trial in candidates]
