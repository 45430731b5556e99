"""Model evaluations on record: what every task's evaluation becomes in the store.

A task computes an Evaluation (its resources, headline figures and plots); this module names its
resources and records it. An evaluation is AutoML's list of ModelEvaluation resources (the overall
one, then one per label), written with its plots to a folder and logged to the MLflow run that
made it, under ``evaluations/<ID>/``. The run's ``evaluation_summary`` tag holds the headline
figures, so that listing evaluations reads tags only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.store.resources import new_id, utc_now, write_json_atomic

log = logging.getLogger("trainer")

EVALUATION_FILE = "evaluation.json"


@dataclass
class Evaluation:
    """One evaluation: its resources, its headline figures and how to draw its plots."""

    resources: list[dict[str, Any]]
    figures: dict[str, float]  # what `models evaluations` shows, beside the example count
    plots: Callable[[Path], list[Path]]

    @property
    def evaluation_id(self) -> str:
        """The overall evaluation's ID names the whole evaluation."""
        return self.resources[0]["name"].rsplit("/", 1)[1]

    def summary(self, dataset: str) -> dict[str, Any]:
        overall = self.resources[0]
        return {
            "name": overall["name"],
            "createTime": overall["createTime"],
            "dataset": dataset,
            "evaluatedExampleCount": overall["evaluatedExampleCount"],
            **self.figures,
        }


def named(model_name: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ModelEvaluation resources of ``model_name``, each under a new ID, created now."""
    created = utc_now()
    return [
        {"name": f"{model_name}/modelEvaluations/{new_id('')}", "createTime": created, **body}
        for body in bodies
    ]


def record_evaluation(
    store: Any, run_id: str, folder: Path, evaluation: Evaluation, dataset: str
) -> dict[str, Any]:
    """Write the evaluation beside its plots, log them to the run; return its summary."""
    write_json_atomic(folder / EVALUATION_FILE, evaluation.resources)
    files = [folder / EVALUATION_FILE, *evaluation.plots(folder)]
    store.log_files(run_id, files, f"evaluations/{evaluation.evaluation_id}")
    headline = evaluation.summary(dataset)
    store.set_tags(run_id, {"evaluation_summary": json.dumps(headline)})
    figures = ", ".join(f"{key} {value:.4f}" for key, value in evaluation.figures.items())
    log.info(
        "evaluation %s on %d examples: %s (%s)",
        evaluation.evaluation_id, headline["evaluatedExampleCount"], figures, folder,
    )  # fmt: skip
    return headline
