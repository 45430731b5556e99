"""MULTILABEL datasets on record (issue 33: the datasets API's classificationType): created as
AutoML's, their imports reading ``[ML_USE,]path[,label1,label2,...]`` as one image with all its
labels (a path alone: an image with none), their rows, label stats and trainability read as
MULTILABEL, and a training on one settling a MULTILABEL model; a MULTICLASS dataset refusing a
row of several labels."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from google.cloud import automl_v1

from tests.conftest import FAST, checked, read_json, train
from tests.test_datasets import (
    bare,
    cli,  # noqa: F401 - a fixture
    operation,
    shapes,  # noqa: F401 - a fixture
    strict,
    workspace_of,
    write_csv,
)
from tests.test_resume import mlflow_client
from trainer.errors import UserError
from trainer.settings import Workspace

BUDGET = 6  # milli-node-hours: 21.6 s at most, tests/test_multilabel.py's one-process training


def stored_rows(workspace: Workspace, dataset: str) -> list[list[str]]:
    """The rows the dataset keeps (its current rows.csv)."""
    from trainer.store.datasets import ROWS, DatasetStore

    store = DatasetStore(workspace)
    rows_csv = store.version_file(store.record(dataset), ROWS)
    assert rows_csv is not None
    with rows_csv.open(newline="") as handle:
        return list(csv.reader(handle))


def multilabel_dataset(workspace: Workspace, name: str = "tags") -> str:
    from trainer.datasets import create_dataset

    created = create_dataset(workspace, name, "image_classification", "MULTILABEL")
    return bare(created.dataset)


def imported(cwd: Path, source: Path) -> tuple[Workspace, str]:
    """cwd's store, and a MULTILABEL dataset there holding ``source``'s rows."""
    from trainer.datasets import import_data

    workspace = workspace_of(cwd)
    dataset = multilabel_dataset(workspace)
    assert "error" not in import_data(workspace, dataset, [str(source)])
    return workspace, dataset


def test_a_multilabel_dataset_is_created_as_automls(cli) -> None:  # noqa: F811
    result = cli("datasets", "create", "--display-name", "tags", "--task", "image_classification",
                 "--classification-type", "MULTILABEL", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = json.loads(result.stdout)
    assert dataset["imageClassificationDatasetMetadata"] == {"classificationType": "MULTILABEL"}
    parsed = strict(automl_v1.Dataset, dataset)
    kind = parsed.image_classification_dataset_metadata.classification_type
    assert kind == automl_v1.ClassificationType.MULTILABEL


def test_a_multilabel_import_keeps_every_label_of_an_image(
    tmp_path: Path,
    multilabel_csv: Path,
    shapes: Path,  # noqa: F811
) -> None:
    from trainer.datasets import get_dataset, import_data, label_stats

    workspace = workspace_of(tmp_path)
    dataset = multilabel_dataset(workspace)
    alone, tagged = shapes / "circle" / "circle_0000.png", shapes / "circle" / "circle_0001.png"
    first = write_csv(tmp_path / "first.csv", [
        ["TEST", str(alone)],  # an image with none of the labels
        ["TRAIN", str(tagged), "square", "circle", "square"],  # sorted, once each
    ])  # fmt: skip
    assert "partialFailures" not in import_data(workspace, dataset, [str(first)])["metadata"]
    # A second import appends to the rows held, the image without labels among them.
    ended = import_data(workspace, dataset, [str(multilabel_csv)])
    assert "error" not in ended and "partialFailures" not in ended["metadata"]

    rows = stored_rows(workspace, dataset)
    assert rows[:2] == [["TEST", str(alone)], ["TRAIN", str(tagged), "circle", "square"]]
    given = [line.split(",") for line in multilabel_csv.read_text().splitlines()]
    images = multilabel_csv.parent / "images"
    assert ["UNASSIGNED", str(images / "00000.png"), *sorted(given[0][1:])] in rows
    assert len(rows) == 2 + len(given)

    stats = label_stats(workspace, dataset)
    assert stats["exampleCount"] == 2 + len(given)  # the image without labels counts too
    want = Counter(label for row in given for label in row[1:])
    want.update(["circle", "square"])
    assert {label["displayName"]: label["exampleCount"] for label in stats["labels"]} == want
    assert max(want.values()) < len(given)  # an image counted under each of its labels
    # Trainable read as MULTILABEL (read as MULTICLASS its rows of several labels are refused).
    assert "NOT_TRAINABLE" not in {item["code"] for item in stats["advice"]}
    resource = get_dataset(workspace, dataset)
    assert resource["exampleCount"] == 2 + len(given)
    strict(automl_v1.Dataset, resource)


def test_a_multiclass_import_refuses_a_row_of_several_labels(
    cli,  # noqa: F811
    tmp_path: Path,
    shapes: Path,  # noqa: F811
) -> None:
    created = cli("datasets", "create", "--display-name", "one", "--task",
                  "image_classification", "--json")  # fmt: skip
    dataset = json.loads(created.stdout)
    assert dataset["imageClassificationDatasetMetadata"] == {"classificationType": "MULTICLASS"}
    rows = [["TRAIN", str(shapes / "circle" / f"circle_000{i}.png"), "circle"] for i in range(3)]
    rows.append(["TRAIN", str(shapes / "square" / "square_0000.png"), "square", "circle"])
    imported = cli("datasets", "import", bare(dataset), str(write_csv(tmp_path / "in.csv", rows)))
    assert imported.returncode == 0, imported.stderr
    (failure,) = operation(cli, imported.stdout.strip())["metadata"]["partialFailures"]
    assert failure["code"] == 3 and f"{tmp_path / 'in.csv'}:4: " in failure["message"]
    assert (
        "2 labels (circle, square) in a MULTICLASS dataset, which takes one label an image"
        in (failure["message"])
    )
    assert "square_0000.png,square,circle)" in failure["message"]  # the row itself
    assert "\n" not in failure["message"]
    assert json.loads(cli("datasets", "get", bare(dataset), "--json").stdout)["exampleCount"] == 3


def test_a_folder_imports_into_a_multilabel_dataset(
    tmp_path: Path,
    shapes: Path,  # noqa: F811
) -> None:
    from trainer.datasets import label_stats

    workspace, dataset = imported(tmp_path, shapes)
    rows = stored_rows(workspace, dataset)
    assert len(rows) == 72 and {len(row) for row in rows} == {3}  # one label each: its folder's
    assert ["UNASSIGNED", str(shapes / "cross" / "cross_0003.png"), "cross"] in rows
    stats = label_stats(workspace, dataset)
    assert {label["exampleCount"] for label in stats["labels"]} == {12}


def training_settings(workspace: Workspace, *overrides: str) -> Any:
    return checked(Path(workspace.home), workspace.tracking_uri.reveal(), *overrides)


def test_a_training_reads_the_datasets_type_and_refuses_another(
    tmp_path: Path,
    shapes: Path,  # noqa: F811
) -> None:
    from trainer.datasets import create_dataset, import_data

    workspace = workspace_of(tmp_path)
    tags = multilabel_dataset(workspace)
    one = bare(create_dataset(workspace, "one", "image_classification").dataset)
    for dataset in (tags, one):
        import_data(workspace, dataset, [str(shapes)])
    # auto takes the dataset's type: its rows of one label each read as MULTILABEL all the same.
    settings = training_settings(workspace, f"dataset_id={tags}")
    assert settings.dataset.classification_type == "MULTILABEL"
    assert training_settings(workspace, f"dataset_id={one}").dataset.classification_type == (
        "MULTICLASS"
    )
    same = training_settings(
        workspace, f"dataset_id={tags}", "dataset.classification_type=MULTILABEL"
    )
    assert same.dataset.classification_type == "MULTILABEL"
    contradictions = [(tags, "MULTILABEL", "MULTICLASS"), (one, "MULTICLASS", "MULTILABEL")]
    for dataset, kind, given in contradictions:
        with pytest.raises(UserError) as refused:
            training_settings(
                workspace, f"dataset_id={dataset}", f"dataset.classification_type={given}"
            )
        message = str(refused.value)
        assert f"dataset {dataset} is a {kind} dataset" in message
        assert f"dataset.classification_type={given}" in message and "\n" not in message


def test_a_multilabel_dataset_on_record_trains_a_multilabel_model(
    tmp_path: Path,
    multilabel_csv: Path,
) -> None:
    _, dataset = imported(tmp_path, multilabel_csv)
    model, run_dir = train(
        tmp_path, tmp_path / "home", *FAST, f"dataset_id={dataset}", "display_name=tags_on_record",
        f"budget.train_budget_milli_node_hours={BUDGET}",
        # FAST judges convergence on val_accuracy, which a MULTILABEL model has not.
        "task.convergence_monitor=val_loss", "task.convergence_monitor_mode=min",
    )  # fmt: skip
    assert model["datasetId"] == dataset
    config = read_json(run_dir / "state.json")["config"]
    assert config["dataset"]["classification_type"] == "MULTILABEL"
    assert config["task"]["monitor"] == "val_auprc"
    metrics = read_json(run_dir / "metrics.json")
    assert 0 < metrics["test_auprc"] <= 1 and "test_accuracy" not in metrics
    registered = mlflow_client(tmp_path).get_registered_model(model["name"].rsplit("/", 1)[1])
    assert registered.tags["classification_type"] == "MULTILABEL"
