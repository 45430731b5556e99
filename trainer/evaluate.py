"""`models evaluate`: a stored model scored again, on its TEST split or on another dataset, and
recorded as an evaluation of its own (trainer/store/evaluations.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.data.manifest import TEST
from trainer.errors import UserError
from trainer.store.evaluations import record_evaluation
from trainer.store.lifecycle import operation_on_record
from trainer.stored_model import load_network, trained_model
from trainer.tasks import task_of


def evaluate_stored(catalog: Any, model_id: str, dataset: str | None) -> tuple[Path, dict]:
    """`models evaluate`: score the model on its own TEST split, or on all of another labelled
    dataset with the same labels; record the evaluation in a run of its own."""
    trained = trained_model(catalog, model_id, "evaluation")
    settings = trained.settings
    task = task_of(settings)
    if dataset is None:
        items, described = task.read_manifest(settings).split(TEST), "the model's TEST split"
    else:
        elsewhere = settings.replace_in("dataset", path=dataset)
        other = task.read_manifest(elsewhere, for_training=False)
        items, described = _foreign_items(other, trained.labels), str(dataset)
    if not items:
        raise UserError(f"{described} has nothing to evaluate on")
    evaluation = task.evaluate_items(
        load_network(trained), settings, items, trained.labels, trained.model["name"]
    )
    tags = {"model_id": trained.model_id, "kind": "evaluate", "dataset": described}
    name, params = f"evaluate_{trained.model['displayName']}", {"dataset": dataset}
    folder = Path("evaluations") / trained.model_id / evaluation.evaluation_id
    with operation_on_record(catalog.store, name, tags, params) as run:
        headline = record_evaluation(catalog.store, run.run_id, folder, evaluation, described)
    return folder, headline


def _foreign_items(manifest: Any, model_labels: list[str]) -> list[Any]:
    unknown = sorted(set(manifest.labels) - set(model_labels))
    if unknown:
        raise UserError(
            f"the dataset has labels the model was not trained on: {', '.join(unknown)} "
            f"(the model knows {', '.join(model_labels)})"
        )
    return manifest.items
