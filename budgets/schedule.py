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
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from budgets.callback import BudgetStopping

FACTOR = "budget_lr_factor"


class BudgetDecay(Callback):
    def __init__(self, budget: BudgetStopping, final_factor: float) -> None:
        if not 0.0 < final_factor <= 1.0:
            raise ValueError(f"final_lr_factor must lie in (0, 1], not {final_factor}")
        self.budget, self.final_factor = budget, final_factor

    def factor(self, fraction_spent: float) -> float:
        return max(self.final_factor, 1.0 - fraction_spent)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        factor = self.factor(self.budget.fraction_spent)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= factor / group.get(FACTOR, 1.0)
                group[FACTOR] = factor
