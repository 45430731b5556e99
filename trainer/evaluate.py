"""Model evaluations on record: computed at the end of every training and by `models evaluate`.

An evaluation is AutoML's list of ModelEvaluation resources (the overall one, then one per
label), written with its plots to a folder and logged to the MLflow run that made it, under
``evaluations/<ID>/``. The run's ``evaluation_summary`` tag holds the headline figures, so that
listing evaluations reads tags only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data.manifest import Item
from trainer.errors import UserError
from trainer.store.resources import new_id, utc_now, write_json_atomic

log = logging.getLogger("trainer")

EVALUATION_FILE = "evaluation.json"
WORST_EXAMPLES = 8


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
    created = utc_now()
    return [
        {"name": f"{model_name}/modelEvaluations/{new_id('')}", "createTime": created, **body}
        for body in bodies
    ]


def classification_evaluation(
    model_name: str,
    scores: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    items: Sequence[Item] | None = None,
) -> Evaluation:
    """For image or video classification; ``items`` (images) add the worst-examples grid."""
    from evaluation.classification import accuracy, classification_evaluations

    resources = named(model_name, classification_evaluations(scores, targets, labels))
    figures = resources[0]["classificationEvaluationMetrics"]

    def plots(folder: Path) -> list[Path]:
        from evaluation.plots import confusion_matrix_png, image_grid_png, precision_recall_png

        counts = np.array([row["exampleCount"] for row in figures["confusionMatrix"]["row"]])
        written = [
            precision_recall_png(scores, targets, labels, folder / "precision_recall.png"),
            confusion_matrix_png(counts, labels, folder / "confusion_matrix.png"),
        ]
        if items is not None:
            images, titles = worst_examples(scores, targets, items, labels)
            written.append(image_grid_png(images, titles, folder / "worst_examples.png"))
        return written

    headline = {
        "accuracy": accuracy(resources[0]),
        "auPrc": figures["auPrc"],
        "auRoc": figures["auRoc"],
        "logLoss": figures["logLoss"],
    }
    return Evaluation(resources, headline, plots)


def worst_examples(
    scores: np.ndarray,
    targets: np.ndarray,
    items: Sequence[Item],
    labels: Sequence[str],
    count: int = WORST_EXAMPLES,
) -> tuple[list[np.ndarray], list[str]]:
    """The examples with the lowest score for their true label, with what the model said."""
    from PIL import Image

    true_scores = scores[np.arange(len(targets)), targets]
    images, titles = [], []
    for index in np.argsort(true_scores)[:count]:
        predicted = int(scores[index].argmax())
        with Image.open(items[index].path) as image:
            images.append(np.asarray(image.convert("RGB")))
        titles.append(
            f"{Path(items[index].key).name}\ntrue {labels[targets[index]]} "
            f"({true_scores[index]:.2f}), said {labels[predicted]} ({scores[index, predicted]:.2f})"
        )
    return images, titles


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


# -- evaluating a stored model again ------------------------------------------------------


def evaluate_stored(catalog: Any, model_id: str, dataset: str | None) -> tuple[Path, dict]:
    """`models evaluate`: score the model on its own TEST split, or on all of another labelled
    dataset with the same labels; record the evaluation in a run of its own."""
    from trainer.data.manifest import TEST
    from trainer.stored_model import load_network, trained_model
    from trainer.tasks import task_of

    trained = trained_model(catalog, model_id, "evaluation")
    cfg = trained.config
    task = task_of(cfg)
    if dataset is None:
        items, described = task.read_manifest(cfg).split(TEST), "the model's TEST split"
    else:
        other = task.read_manifest({**cfg, "dataset": {"path": dataset}}, for_training=False)
        items, described = _foreign_items(other, trained.labels), str(dataset)
    if not items:
        raise UserError(f"{described} has nothing to evaluate on")
    evaluation = task.evaluate_items(
        load_network(trained), cfg, items, trained.labels, trained.model["name"]
    )
    store = catalog.store
    tags = {"model_id": trained.model_id, "kind": "evaluate", "dataset": described}
    run_id = store.start_run(f"evaluate_{trained.model['displayName']}", tags, {"dataset": dataset})
    folder = Path("evaluations") / trained.model_id / evaluation.evaluation_id
    try:
        headline = record_evaluation(store, run_id, folder, evaluation, described)
    except BaseException:
        store.end_run(run_id, "FAILED")
        raise
    store.end_run(run_id)
    return folder, headline


def _foreign_items(manifest: Any, model_labels: list[str]) -> list[Any]:
    unknown = sorted(set(manifest.labels) - set(model_labels))
    if unknown:
        raise UserError(
            f"the dataset has labels the model was not trained on: {', '.join(unknown)} "
            f"(the model knows {', '.join(model_labels)})"
        )
    return manifest.items


def score_batches(network: Any, loader: Any) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true label indices of every (inputs, targets) batch; a batch
    that failed to load entirely (None, as video loaders give) is left out."""
    import torch

    scores, targets = [], []
    with torch.inference_mode():
        for batch in loader:
            if batch is None:
                continue
            inputs, batch_targets = batch
            scores.append(network(inputs).float().softmax(dim=1))
            targets.append(batch_targets)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()
