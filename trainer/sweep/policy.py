"""What the sweep does next, decided from its records alone: no process, no Optuna, no file.

The runner asks ``SweepPolicy.next`` whenever a slot is free, carries out the answer (a
promotion resumes a trial's operation, a start asks Optuna for a new trial) and asks again with
what changed; it settles each ended trial in the state ``settled_state`` gives. So the policy is
tested on plain records, as Optuna's pruners and Ray Tune's schedulers are, and the runner only
executes. The ledger stays the guard: it admits a decision's grant or refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from budgets.ledger import TrialState
from trainer.sweep.record import TrialRecord
from trainer.sweep.rungs import RungResult, promotable


@dataclass(frozen=True)
class Promote:
    """Continue a paused trial's operation up to the next rung's cumulative budget."""

    trial: int
    rung: int  # the rung it goes on to
    limit: int  # that rung's cumulative budget


@dataclass(frozen=True)
class Start:
    """A new trial at the first rung."""

    limit: int


Decision = Promote | Start


@dataclass(frozen=True)
class SweepPolicy:
    """Asynchronous successive halving over ``rungs`` (cumulative budgets, milli-node-hours)."""

    rungs: tuple[int, ...]
    factor: int
    maximize: bool
    parallel: int
    max_trials: int | None  # sweep.max_trials, or the grid's size where that is smaller

    def next(self, trials: Sequence[TrialRecord], available: int, started: int) -> Decision | None:
        """The next trial to run in a free slot, given the ``trials`` on record, what the
        ledger has ``available`` and how many trials Optuna has ``started``: the best paused
        trial due for promotion, from the highest rung down, whose extra grant fits; otherwise a
        new trial if its first rung fits and the trials are not all asked; otherwise None."""
        by_number = {t.number: t for t in trials}
        for rung in reversed(range(len(self.rungs) - 1)):
            limit = self.rungs[rung + 1]
            results = [RungResult(t.number, r.value) for t in trials
                       for r in t.results[rung : rung + 1] if r.value is not None]  # fmt: skip
            paused = [t.number for t in trials
                      if t.rung == rung and t.state is TrialState.PAUSED]  # fmt: skip
            for number in promotable(results, paused, self.factor, self.maximize):
                cost = by_number[number].cost
                if cost < limit and limit - cost <= available:
                    return Promote(number, rung + 1, limit)
        if self.max_trials is not None and started >= self.max_trials:
            return None
        if available < self.rungs[0]:
            return None
        return Start(self.rungs[0])

    def settled_state(self, ended: TrialState, rung: int, stopping: bool) -> TrialState:
        """The state a trial is settled in when its training ``ended`` in that state: a pause
        at the last rung is the trial done, and a pause while the sweep stops is a cancel."""
        if ended is TrialState.PAUSED and rung == len(self.rungs) - 1:
            return TrialState.DONE
        if ended is TrialState.PAUSED and stopping:
            return TrialState.CANCELLED
        return ended

    def gave_up(self, trials: Sequence[TrialRecord]) -> list[TrialRecord]:
        """The last trials to end, when they all failed before a result (a bad value of the
        space, a dataset that cannot train): new ones would too, so none starts. Empty while
        the last ``max(3, parallel)`` trials did not all fail."""
        window = max(3, self.parallel)
        ended = sorted((t for t in trials if t.results), key=lambda t: t.number)
        recent = ended[-window:]
        if len(recent) < window or any(t.state is not TrialState.FAILED for t in recent):
            return []
        return recent
