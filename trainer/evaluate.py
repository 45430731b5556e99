"""Model evaluations on record: computed at the end of every training and by `models evaluate`.

An evaluation is AutoML's list of ModelEvaluation resources (the overall one, then one per
label), written with its plots to a folder and logged to the MLflow run that made it, under
``evaluations/<ID>/``. The run's ``evaluation_summary`` tag holds the headline figures, so that
listing evaluations reads tags only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainer.data import Item
from trainer.errors import UserError
from trainer.resources import new_id, utc_now, write_json_atomic

log = logging.getLogger("trainer")

EVALUATION_FILE = "evaluation.json"
WORST_EXAMPLES = 8


def evaluation_resources(
    model_name: str, scores: np.ndarray, targets: np.ndarray, labels: Sequence[str]
) -> list[dict[str, Any]]:
    from evaluation.classification import classification_evaluations

    created = utc_now()
    return [
        {"name": f"{model_name}/modelEvaluations/{new_id('')}", "createTime": created, **body}
        for body in classification_evaluations(scores, targets, labels)
    ]


def evaluation_id(resources: list[dict[str, Any]]) -> str:
    """The overall evaluation's ID names the whole evaluation."""
    return resources[0]["name"].rsplit("/", 1)[1]


def summary(resources: list[dict[str, Any]], dataset: str) -> dict[str, Any]:
    from evaluation.classification import accuracy

    overall = resources[0]
    figures = overall["classificationEvaluationMetrics"]
    return {
        "name": overall["name"],
        "createTime": overall["createTime"],
        "dataset": dataset,
        "evaluatedExampleCount": overall["evaluatedExampleCount"],
        "accuracy": accuracy(overall),
        "auPrc": figures["auPrc"],
        "auRoc": figures["auRoc"],
        "logLoss": figures["logLoss"],
    }


def write_evaluation(
    folder: Path,
    resources: list[dict[str, Any]],
    scores: np.ndarray,
    targets: np.ndarray,
    items: Sequence[Item],
    labels: Sequence[str],
) -> list[Path]:
    """The resources and the three plots; returns the files written."""
    from evaluation.plots import confusion_matrix_png, image_grid_png, precision_recall_png

    write_json_atomic(folder / EVALUATION_FILE, resources)
    matrix = resources[0]["classificationEvaluationMetrics"]["confusionMatrix"]
    counts = np.array([row["exampleCount"] for row in matrix["row"]])
    images, titles = worst_examples(scores, targets, items, labels)
    return [
        folder / EVALUATION_FILE,
        precision_recall_png(scores, targets, labels, folder / "precision_recall.png"),
        confusion_matrix_png(counts, labels, folder / "confusion_matrix.png"),
        image_grid_png(images, titles, folder / "worst_examples.png"),
    ]


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
    store: Any,
    run_id: str,
    folder: Path,
    resources: list[dict[str, Any]],
    scores: np.ndarray,
    targets: np.ndarray,
    items: Sequence[Item],
    labels: Sequence[str],
    dataset: str,
) -> dict[str, Any]:
    """Write the evaluation beside its plots, log them to the run; return its summary."""
    files = write_evaluation(folder, resources, scores, targets, items, labels)
    store.log_files(run_id, files, f"evaluations/{evaluation_id(resources)}")
    headline = summary(resources, dataset)
    store.set_tags(run_id, {"evaluation_summary": json.dumps(headline)})
    log.info(
        "evaluation %s on %d examples: accuracy %.4f, auPrc %.4f, log loss %.4f (%s)",
        evaluation_id(resources), headline["evaluatedExampleCount"], headline["accuracy"],
        headline["auPrc"], headline["logLoss"], folder,
    )  # fmt: skip
    return headline


# -- evaluating a stored model again ------------------------------------------------------


def evaluate_stored(catalog: Any, model_id: str, dataset: str | None) -> tuple[Path, dict]:
    """`models evaluate`: score the model on its own TEST split, or on all of another labelled
    dataset with the same labels; record the evaluation in a run of its own."""
    from trainer.data import TEST, read_dataset
    from trainer.stored_model import load_network, trained_model

    trained = trained_model(catalog, model_id, "evaluation")
    if dataset is None:
        items, described = trained.manifest().split(TEST), "the model's TEST split"
    else:
        items, described = (
            _foreign_items(read_dataset(dataset, for_training=False), trained.labels),
            str(dataset),
        )
    if not items:
        raise UserError(f"{described} has no images to evaluate on")
    scores, targets = score_items(load_network(trained), items, trained.labels, trained.transform())
    resources = evaluation_resources(trained.model["name"], scores, targets, trained.labels)
    store = catalog.store
    tags = {"model_id": trained.model_id, "kind": "evaluate", "dataset": described}
    run_id = store.start_run(f"evaluate_{trained.model['displayName']}", tags, {"dataset": dataset})
    folder = Path("evaluations") / trained.model_id / evaluation_id(resources)
    try:
        headline = record_evaluation(
            store, run_id, folder, resources, scores, targets, items, trained.labels, described
        )
    except BaseException:
        store.end_run(run_id, "FAILED")
        raise
    store.end_run(run_id)
    return folder, headline


def _foreign_items(manifest: Any, model_labels: list[str]) -> list[Item]:
    unknown = sorted(set(manifest.labels) - set(model_labels))
    if unknown:
        raise UserError(
            f"the dataset has labels the model was not trained on: {', '.join(unknown)} "
            f"(the model knows {', '.join(model_labels)})"
        )
    return manifest.items


def score_items(
    network: Any, items: Sequence[Item], labels: Sequence[str], transform: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Every item's class probabilities, in ``labels`` order, and its true label index."""
    import torch

    from trainer.images import LabelledImages, make_loader

    loader = make_loader(LabelledImages(items, labels, transform), 64, 0, False, 0)
    scores, targets = [], []
    with torch.inference_mode():
        for images, batch_targets in loader:
            scores.append(network(images).float().softmax(dim=1))
            targets.append(batch_targets)
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()
