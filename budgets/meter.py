"""The budget meter: elapsed wall-clock seconds times nodes, in milli-node-hours.

``cost = ceil(elapsed_seconds * nodes / 3.6)``, so ``cost <= budget`` holds exactly while
``elapsed_seconds <= budget * 3.6 / nodes``. The meter turns that into a deadline and answers
one question for the stopping callback: does a unit of work of a given estimated length still fit?
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

SECONDS_PER_MILLI_NODE_HOUR = 3.6

Clock = Callable[[], float]


def milli_node_hours(elapsed_seconds: float, nodes: int) -> int:
    """DESIGN.md's cost formula, rounded up as AutoML bills."""
    # The epsilon absorbs float noise such as 3.6 * 5 / 3.6 = 5.000000000000001.
    return math.ceil(elapsed_seconds * nodes / SECONDS_PER_MILLI_NODE_HOUR - 1e-9)


@dataclass
class BudgetMeter:
    """Measures one operation's cost against its budget.

    ``spent_before_seconds`` carries node-seconds already billed to the same operation by an
    earlier, interrupted piece of it, so that a resumed operation keeps ``cost <= budget``.
    """

    budget_milli_node_hours: int
    nodes: int = 1
    clock: Clock = time.monotonic
    spent_before_seconds: float = 0.0
    _started_at: float | None = field(default=None, init=False)

    def start(self) -> None:
        if self._started_at is None:
            self._started_at = self.clock()

    @property
    def started(self) -> bool:
        return self._started_at is not None

    def elapsed_seconds(self) -> float:
        """Wall-clock seconds of this operation, earlier pieces included."""
        if self._started_at is None:
            return self.spent_before_seconds
        return self.spent_before_seconds + self.clock() - self._started_at

    def limit_seconds(self) -> float:
        return self.budget_milli_node_hours * SECONDS_PER_MILLI_NODE_HOUR / self.nodes

    def remaining_seconds(self) -> float:
        return self.limit_seconds() - self.elapsed_seconds()

    def cost_milli_node_hours(self) -> int:
        return milli_node_hours(self.elapsed_seconds(), self.nodes)

    def fits(self, seconds: float) -> bool:
        """True when work estimated to take ``seconds`` would end within the budget."""
        return self.elapsed_seconds() + seconds <= self.limit_seconds()

    def fraction_spent(self) -> float:
        return min(1.0, self.elapsed_seconds() / self.limit_seconds())


class WorkEstimator:
    """Predicts how long the next unit of work of one kind will take.

    It answers with the largest of the recent durations times a safety factor, so that a run of
    slowing steps pushes the estimate up at once, while an old outlier ages out of the window.
    Before any measurement it answers ``prior_seconds`` (an estimate from other work).

    With ``warmup_samples``, the first durations (a GPU's first step includes kernel selection
    and can take seconds) are answered only until a steady sample exists; after that they are
    left out, so one cold start does not make the next twenty steps look unaffordable.
    """

    def __init__(
        self, window: int = 20, safety_factor: float = 1.25, warmup_samples: int = 0
    ) -> None:
        self._recent: deque[float] = deque(maxlen=window)
        self._warmup: list[float] = []
        self.warmup_samples = warmup_samples
        self.safety_factor = safety_factor

    def record(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        if len(self._warmup) < self.warmup_samples:
            self._warmup.append(seconds)
        else:
            self._recent.append(seconds)

    @property
    def measured(self) -> bool:
        return bool(self._recent or self._warmup)

    @property
    def warmup_seconds(self) -> list[float]:
        return list(self._warmup)

    def longest(self) -> float | None:
        """The longest duration measured so far (warm-up included), or None."""
        samples = [*self._warmup, *self._recent]
        return max(samples) if samples else None

    def last(self) -> float:
        if self._recent:
            return self._recent[-1]
        return self._warmup[-1] if self._warmup else 0.0

    def estimate(self, prior_seconds: float = 0.0) -> float:
        samples = self._recent or self._warmup  # warm-up samples only while nothing else exists
        if not samples:
            return prior_seconds
        return max(samples) * self.safety_factor
