"""A sweep's pictures, written beside its records and logged to its MLflow run: every trial's
metric against its cost, a point per rung; and Optuna's parallel coordinates of the parameters
against the first rung's metric."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from trainer.sweep.record import SweepRecord, TrialRecord

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

log = logging.getLogger("trainer")


def draw(
    folder: Path, trials: list[TrialRecord], study: optuna.Study, sweep: SweepRecord
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here, none needed
    from matplotlib import pyplot as plt

    drawn = [_metric_against_cost(folder, trials, sweep, plt)]
    try:
        from optuna.visualization.matplotlib import plot_parallel_coordinate

        axes = plot_parallel_coordinate(study)
        figure = cast("Figure", axes.figure)  # a figure of its own, not a subfigure
        path = folder / "parameters.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        drawn.append(path)
    except Exception as error:  # too few finished trials, or one parameter: not worth failing for
        log.info("no parallel-coordinates picture: %s", error)
    return drawn


def _metric_against_cost(
    folder: Path, trials: list[TrialRecord], sweep: SweepRecord, plt: Any
) -> Path:
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for trial in trials:
        points = [(r.cost, r.value) for r in trial.results if r.value is not None]
        if points:
            costs, values = zip(*points, strict=True)
            axes.plot(
                costs, values, marker="o", label=f"{trial.number} ({trial.state.value.lower()})"
            )
    for budget in sweep.rungs:
        axes.axvline(budget, color="grey", linewidth=0.6, linestyle=":")
    axes.set_xlabel("cost (milli-node-hours, cumulative; dotted: rung budgets)")
    axes.set_ylabel(sweep.monitor)
    axes.set_title(f"{sweep.name}: each trial's metric at each rung")
    if len(trials) <= 20:
        axes.legend(fontsize="small", ncol=2)
    path = folder / "metric_vs_cost.png"
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
