"""The learning rate follows the budget: it falls linearly over the seconds a training has.

A training with a budget knows when it will end, and a rate that reaches (nearly) zero at that
end buys more accuracy for the same seconds than a constant one (Li, Yumer and Ramanan,
"Budgeted Training", ICLR 2020: linear decay to the budget's end was best among the schedules
they compared). Lightning's and torch's schedulers count steps or epochs, which a budget in
seconds does not fix in advance, so this callback drives the rate from ``BudgetStopping``'s own
estimate of the training seconds left.

It scales each optimizer group's rate by the change of the factor since the last step, so it
composes with whatever else scales the rate (the warm-up, the drop on a plateau). The factor
is kept on the group and saved with the optimizer, so a resumed operation goes on where it
stopped; a group without it holds an undecayed rate (a new training, one trained further from
another operation's checkpoint after its rate was reset, or a module that reset the rate).

``anneal(steps)`` brings the end forward: from the next step the factor falls linearly from
where it is to the final factor over ``steps`` steps (or sooner, if the budget's line is
lower), and stays there. Whoever calls it decides when the training has gone as far as its
rate allows (``trainer/job/convergence.py``: before calling it converged). With a constant
schedule (``follow_budget=False``) the factor is 1 until then.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from budgets.callback import BudgetStopping

FACTOR = "budget_lr_factor"


@dataclass(frozen=True)
class Annealing:
    first_step: int
    first_factor: float
    steps: int


class BudgetDecay(Callback):
    def __init__(
        self, budget: BudgetStopping, final_factor: float, follow_budget: bool = True
    ) -> None:
        if not 0.0 < final_factor <= 1.0:
            raise ValueError(f"final_lr_factor must lie in (0, 1], not {final_factor}")
        self.budget, self.final_factor, self.follow_budget = budget, final_factor, follow_budget
        self.annealing: Annealing | None = None
        self._anneal_steps: int | None = None  # asked for, from the next step

    def anneal(self, steps: int) -> None:
        if self.annealing is None:
            self._anneal_steps = max(1, steps)

    def factor(self, fraction_spent: float, step: int) -> float:
        line = max(self.final_factor, 1.0 - fraction_spent) if self.follow_budget else 1.0
        if self.annealing is None:
            return line
        # The first annealed step is already lower; the last one is at the floor.
        start, done = self.annealing.first_factor, step - self.annealing.first_step + 1
        share = min(1.0, done / self.annealing.steps)
        return min(line, start + (self.final_factor - start) * share)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step, spent = trainer.global_step, self.budget.fraction_spent
        if self._anneal_steps is not None:
            self.annealing = Annealing(step, self.factor(spent, step), self._anneal_steps)
            self._anneal_steps = None
        factor = self.factor(spent, step)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= factor / group.get(FACTOR, 1.0)
                group[FACTOR] = factor

    def state_dict(self) -> dict[str, Any]:
        annealing = None if self.annealing is None else asdict(self.annealing)
        return {"annealing": annealing, "anneal_steps": self._anneal_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        annealing = state_dict.get("annealing")
        self.annealing = None if annealing is None else Annealing(**annealing)
        self._anneal_steps = state_dict.get("anneal_steps")
