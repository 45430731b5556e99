"""Datasets (issue 30, point 2): create, importData, list, get, delete through the CLI and the
functions the API server calls; import errors as partialFailures; label stats and AutoML's
advice; every resource parsed strictly by Google's own message types; a detached import in a
process of its own; a training on a dataset's rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from google.cloud import automl_v1, automl_v1beta1
from google.longrunning import operations_pb2
from google.protobuf import json_format

from tests.conftest import FAST, Ran, cli_in_process, run_trainer
from tests.test_manage import mlflow_server, one_line_error  # noqa: F401 - a fixture
from tests.test_resume import wait_for
from trainer.data.dataset_rows import ImportRow
from trainer.data.label_stats import label_stats as count_labels
from trainer.errors import FailedPrecondition, NotFound, UserError
from trainer.settings import Workspace
from trainer.tasks.image_classification.demo import write_shapes

# The message types an Operation's Any fields name must be loaded before they are parsed.
for _api in (automl_v1, automl_v1beta1):
    for _message in (_api.OperationMetadata, _api.Dataset):
        _message.pb()


def strict(message: Any, data: dict[str, Any]) -> Any:
    """``data`` parsed into ``message``, any field the type lacks refused."""
    pb_class = message.pb() if hasattr(message, "pb") else message
    return json_format.ParseDict(data, pb_class(), ignore_unknown_fields=False)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Six labels of 12 generated 32-pixel images, one sub-folder each."""
    folder = tmp_path_factory.mktemp("dataset_shapes")
    write_shapes(folder, per_label=12, size=32, seed=5)
    return folder


@pytest.fixture
def cli(tmp_path: Path, monkeypatch, capsys):
    """`python -m trainer ...` in this process, on tmp_path's store and home."""
    monkeypatch.setenv("VISION_TRAINER_HOME", str(tmp_path / "home"))

    def run(*args: str) -> Ran:
        return cli_in_process(tmp_path, monkeypatch, capsys, *args)

    return run


def workspace_of(cwd: Path) -> Workspace:
    return Workspace(
        home=str(cwd / "home"),
        tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}",
        experiment_name="vision-trainer",
    )


def created(cli, task: str = "image_classification", name: str = "shapes") -> dict[str, Any]:
    result = cli("datasets", "create", "--display-name", name, "--task", task, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def bare(resource: dict[str, Any]) -> str:
    return resource["name"].rsplit("/", 1)[-1]


def operation(cli, name: str) -> dict[str, Any]:
    result = cli("operations", "get", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def labelled_rows(shapes: Path, labels: list[str], ml_uses: list[str]) -> list[list[str]]:
    """``ML_USE,path,label`` rows of the generated images, the splits in turn."""
    files = [(label, file) for label in labels for file in sorted((shapes / label).glob("*.png"))]
    return [[ml_uses[i % len(ml_uses)], str(file), label] for i, (label, file) in enumerate(files)]


# -- the verbs ---------------------------------------------------------------------------------


def test_create_import_list_get_delete_through_the_cli(cli, shapes: Path) -> None:
    dataset = created(cli)
    assert dataset["name"].startswith("projects/local/locations/local/datasets/ICN")
    assert dataset["imageClassificationDatasetMetadata"] == {"classificationType": "MULTICLASS"}
    assert dataset["exampleCount"] == 0
    imported = cli("datasets", "import", bare(dataset), str(shapes))
    assert imported.returncode == 0, imported.stderr
    done = operation(cli, imported.stdout.strip())
    assert done["done"] and done["response"]["@type"].endswith("google.protobuf.Empty")
    assert "importDataDetails" in done["metadata"] and "error" not in done

    listed = json.loads(cli("datasets", "list", "--json").stdout)["datasets"]
    assert [d["name"] for d in listed] == [dataset["name"]]
    assert listed[0]["exampleCount"] == 72 and listed[0]["etag"] != dataset["etag"]
    table = cli("datasets", "get", bare(dataset))
    assert table.returncode == 0, table.stderr
    assert "circle" in table.stdout and "UNASSIGNED" in table.stdout
    assert "advice: FEW_EXAMPLES" in table.stdout  # 12 a label: 100 are recommended
    operations = json.loads(cli("operations", "list", "--json").stdout)["operations"]
    assert imported.stdout.strip() in {op["name"] for op in operations}

    deleted = cli("datasets", "delete", dataset["name"])
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(cli("datasets", "list", "--json").stdout)["datasets"] == []
    missing = cli("datasets", "get", bare(dataset))
    assert missing.returncode == 2 and "is not in" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_unknown_classification_types_are_refused_in_one_line(cli) -> None:
    # MULTILABEL is taken: tests/test_datasets_multilabel.py.
    result = cli("datasets", "create", "--display-name", "d", "--task", "image_classification",
                 "--classification-type", "BINARY")  # fmt: skip
    assert result.returncode == 2
    assert "'BINARY' is invalid; use MULTICLASS or MULTILABEL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli("datasets", "create", "--display-name", "d", "--task", "object_detection",
                 "--classification-type", "MULTICLASS")  # fmt: skip
    assert result.returncode == 2 and "takes none" in result.stderr
    assert json.loads(cli("datasets", "list", "--json").stdout)["datasets"] == []


def test_bad_rows_become_partial_failures(cli, shapes: Path, tmp_path: Path) -> None:
    dataset = created(cli)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    good = labelled_rows(shapes, ["circle", "square"], ["TRAIN", "VALIDATE", "TEST"])
    rows = [
        *good,
        ["TRAIN", str(tmp_path / "nowhere.png"), "circle"],
        ["TEST", str(broken), "square"],
        ["TRAINING", str(shapes / "cross" / "cross_0000.png"), "cross"],
        ["TRAIN", str(shapes / "cross" / "cross_0001.png"), "not-a-label"],
    ]
    imported = cli("datasets", "import", bare(dataset), str(write_csv(tmp_path / "in.csv", rows)))
    assert imported.returncode == 0, imported.stderr
    failures = operation(cli, imported.stdout.strip())["metadata"]["partialFailures"]
    by_code = {failure["code"]: failure["message"] for failure in failures}
    assert len(failures) == 4 and set(by_code) == {5, 3}  # NOT_FOUND, INVALID_ARGUMENT
    assert "missing file" in by_code[5] and "nowhere.png" in by_code[5]
    messages = " | ".join(failure["message"] for failure in failures)
    assert "broken file" in messages and "broken.png" in messages
    assert "unknown ML_USE 'TRAINING'" in messages and "in.csv:" in messages
    assert "not-a-label" in messages  # each failure names its row
    assert imported.stderr.count("warning: row not imported") == 4
    stats = json.loads((cli("datasets", "get", bare(dataset), "--json")).stdout)
    assert stats["exampleCount"] == len(good)


def test_an_import_of_nothing_but_bad_rows_fails(cli, tmp_path: Path) -> None:
    dataset = created(cli)
    rows = [["TRAIN", str(tmp_path / f"{i}.png"), "circle"] for i in range(25)]
    rows.append(["TRAIN", "b.png"])
    result = cli("datasets", "import", bare(dataset), str(write_csv(tmp_path / "bad.csv", rows)))
    assert result.returncode == 2 and "no row was imported: 26 failed" in result.stderr
    ended = operation(cli, result.stdout.strip())
    assert ended["done"] and ended["error"]["code"] == 3
    failures = ended["metadata"]["partialFailures"]
    assert len(failures) == 21 and failures[-1]["message"].startswith("6 more: see import_errors")
    (listed,) = (tmp_path / "mlartifacts").rglob("import_errors.csv")  # every one of them
    assert len(listed.read_text().splitlines()) == 1 + 26
    assert get_dataset_count(cli, dataset) == 0


def get_dataset_count(cli, dataset: dict[str, Any]) -> int:
    return json.loads(cli("datasets", "get", bare(dataset), "--json").stdout)["exampleCount"]


def test_importing_again_appends(cli, shapes: Path, tmp_path: Path) -> None:
    dataset = created(cli)
    first = labelled_rows(shapes, ["circle", "square"], ["TRAIN"])
    second = labelled_rows(shapes, ["cross"], ["TEST"])
    cli("datasets", "import", bare(dataset), str(write_csv(tmp_path / "a.csv", first)))
    assert get_dataset_count(cli, dataset) == 24
    conflict = [["TRAIN", first[0][1], "triangle"]]  # the same image under another label
    again = write_csv(tmp_path / "b.csv", [*first[:5], *second, *conflict])
    result = cli("datasets", "import", bare(dataset), str(again))
    assert result.returncode == 0, result.stderr
    assert get_dataset_count(cli, dataset) == 36  # the repeated rows are kept once
    (failure,) = operation(cli, result.stdout.strip())["metadata"]["partialFailures"]
    assert failure["code"] == 6 and "already in the dataset" in failure["message"]
    table = cli("datasets", "get", bare(dataset)).stdout
    assert "cross" in table and "NOT_TRAINABLE" in table  # no VALIDATION yet


def test_label_stats_count_each_split_and_name_the_specs(tmp_path: Path, shapes: Path) -> None:
    from trainer.datasets import (
        create_dataset,
        get_annotation_spec,
        import_data,
        label_stats,
        list_annotation_specs,
    )

    workspace = workspace_of(tmp_path)
    dataset = create_dataset(workspace, "splits", "image_classification").dataset
    rows = labelled_rows(shapes, ["circle", "square"], ["TRAIN", "VALIDATE", "TEST", "UNASSIGNED"])
    source = write_csv(tmp_path / "s.csv", rows)
    ended = import_data(workspace, bare(dataset), [source.as_uri()])  # a file:// URI
    assert "error" not in ended
    stats = label_stats(workspace, dataset["name"])
    assert stats["splits"] == {"TRAIN": 6, "VALIDATION": 6, "TEST": 6, "UNASSIGNED": 6}
    circle = next(label for label in stats["labels"] if label["displayName"] == "circle")
    assert circle["exampleCount"] == 12 and set(circle["splits"].values()) == {3}
    assert stats["adequate"] and [a["code"] for a in stats["advice"]] == ["FEW_EXAMPLES"]
    specs = list_annotation_specs(workspace, bare(dataset))
    assert [spec["displayName"] for spec in specs] == ["circle", "square"]
    assert get_annotation_spec(workspace, specs[0]["name"]) == specs[0]
    for spec in specs:
        strict(automl_v1.AnnotationSpec, spec)
    with pytest.raises(NotFound):
        get_annotation_spec(workspace, f"{dataset['name']}/annotationSpecs/1")


# -- label stats and advice --------------------------------------------------------------------


def rows_of(label: str, count: int, split: str = "TRAIN", start: int = 0) -> list[ImportRow]:
    paths = [Path(f"/{label}/{i}.png") for i in range(start, start + count)]
    return [ImportRow(split, p, (label,), (label,), str(p)) for p in paths]


def box(label: str, path: str, edge: float) -> ImportRow:
    corners = (0.1, 0.1, 0.1 + edge, 0.1 + edge)
    return ImportRow("TRAIN", Path(path), (label,), (label,), f"{path}{edge}{label}", box=corners)


def advice(stats: dict[str, Any]) -> dict[str, list[str]]:
    return {item["code"]: item["labels"] for item in stats["advice"]}


def test_each_piece_of_advice_names_its_labels() -> None:
    rows = rows_of("rare", 5) + rows_of("some", 50) + rows_of("common", 1200)
    stats = count_labels(rows, {}, "image", None, {})
    found = advice(stats)
    assert found["TOO_FEW_EXAMPLES"] == ["rare"]
    assert found["FEW_EXAMPLES"] == ["some"]
    assert found["IMBALANCED"] == ["common", "rare"]  # 1200 > 100 x 5; 50 is within
    assert not stats["adequate"]
    enough = count_labels(rows_of("a", 100) + rows_of("b", 120), {}, "image", None, {})
    assert enough["advice"] == [] and enough["adequate"]
    refused = count_labels(rows_of("a", 100) + rows_of("b", 120), {}, "image",
                           "label(s) b have no TRAIN item in the dataset", {})  # fmt: skip
    assert advice(refused) == {"NOT_TRAINABLE": ["b"]} and not refused["adequate"]


def test_box_advice_names_small_boxes_and_crowded_images() -> None:
    facts = {"/big.png": {"size": [1000, 1000]}, "/small.png": {"size": [100, 100]}}
    rows = [box("car", "/big.png", 0.2), box("bird", "/small.png", 0.05)]  # bird: 5 px
    rows += [box("person", "/crowd.png", 0.001 * (i + 1)) for i in range(501)]
    stats = count_labels(rows, facts, "image", None, {"SMALL_BOXES": {"kite": 2}})
    found = advice(stats)
    assert found["SMALL_BOXES"] == ["bird", "kite"]  # under 8 px, and refused under 0.01
    assert found["CROWDED_IMAGES"] == ["person"]
    person = next(label for label in stats["labels"] if label["displayName"] == "person")
    assert person["boxes"] == 501 and person["exampleCount"] == 1


def test_detection_import_refuses_small_boxes_and_parses(cli, tmp_path: Path) -> None:
    from trainer.tasks.object_detection.demo import write_detection_shapes

    dataset = created(cli, "object_detection", "boxes")
    assert dataset["imageObjectDetectionDatasetMetadata"] == {}
    source = write_detection_shapes(tmp_path / "det", images=20, size=64, seed=2)
    image = tmp_path / "det" / "images" / "shapes_0000.png"
    with source.open("a", newline="") as handle:
        csv.writer(handle).writerow(["TRAIN", str(image), "kite", "0.1", "0.1", "", "",
                                     "0.105", "0.3", "", ""])  # fmt: skip
    result = cli("datasets", "import", bare(dataset), str(source))
    assert result.returncode == 0, result.stderr
    ended = operation(cli, result.stdout.strip())
    (failure,) = ended["metadata"]["partialFailures"]
    assert "box edge < 0.01" in failure["message"]
    stats = cli("datasets", "get", bare(dataset))
    assert "boxes" in stats.stdout and "advice: SMALL_BOXES" in stats.stdout
    assert "kite" in stats.stdout.split("SMALL_BOXES")[1]
    parsed = strict(operations_pb2.Operation, ended)
    metadata = automl_v1.OperationMetadata.pb()()
    assert parsed.metadata.Unpack(metadata) and metadata.HasField("import_data_details")
    strict(automl_v1.Dataset, json.loads(cli("datasets", "get", bare(dataset), "--json").stdout))


def test_video_datasets_are_v1beta1(cli, tmp_path: Path) -> None:
    from trainer.tasks.video_classification.demo import write_moving_videos

    result = cli("datasets", "create", "--display-name", "motion", "--task",
                 "video_classification", "--json")  # fmt: skip
    dataset = json.loads(result.stdout)
    source = write_moving_videos(tmp_path / "v", per_label=2, size=16, fps=5, seconds=1.0,
                                 two_segment_videos=0)  # fmt: skip
    with source.open("a", newline="") as handle:
        csv.writer(handle).writerow(["TRAIN", "videos/left_0000.mp4", "up", "5", "inf"])
    imported = cli("datasets", "import", bare(dataset), str(source))
    assert imported.returncode == 0, imported.stderr
    ended = operation(cli, imported.stdout.strip())
    (failure,) = ended["metadata"]["partialFailures"]
    assert "starts at 5s" in failure["message"]
    assert ended["metadata"]["@type"].endswith("automl.v1beta1.OperationMetadata")
    parsed = strict(operations_pb2.Operation, ended)
    assert parsed.metadata.Unpack(automl_v1beta1.OperationMetadata.pb()())
    stored = json.loads(cli("datasets", "get", bare(dataset), "--json").stdout)
    assert stored["exampleCount"] == 8 and stored["videoClassificationDatasetMetadata"] == {}
    strict(automl_v1beta1.Dataset, stored)
    # AutoML Video's CreateDataset answers with the Dataset: no operation is on record for it.
    names = {op["name"] for op in json.loads(cli("operations", "list", "--json").stdout)[
        "operations"]}  # fmt: skip
    assert names == {ended["name"]}


def test_every_resource_parses_with_googles_types(tmp_path: Path, shapes: Path) -> None:
    from trainer.datasets import create_dataset, delete_dataset, import_data, list_datasets

    workspace = workspace_of(tmp_path)
    made = create_dataset(workspace, "parsed", "image_classification", description="shapes")
    strict(automl_v1.Dataset, made.dataset)
    assert made.operation is not None
    parsed = strict(operations_pb2.Operation, made.operation)
    metadata, response = automl_v1.OperationMetadata.pb()(), automl_v1.Dataset.pb()()
    assert parsed.metadata.Unpack(metadata) and metadata.HasField("create_dataset_details")
    assert parsed.response.Unpack(response) and response.display_name == "parsed"
    ended = import_data(workspace, bare(made.dataset), [str(shapes)])
    strict(operations_pb2.Operation, ended)
    strict(automl_v1.ListDatasetsResponse, {"datasets": list_datasets(workspace)})
    deleted = strict(operations_pb2.Operation, delete_dataset(workspace, made.dataset["name"]))
    assert deleted.done and deleted.metadata.Unpack(metadata)
    assert metadata.HasField("delete_details")
    assert deleted.response.type_url.endswith("google.protobuf.Empty")


def test_one_import_at_a_time(tmp_path: Path, shapes: Path) -> None:
    from trainer.datasets import _open_import, create_dataset, delete_dataset, import_data
    from trainer.store.datasets import DatasetStore

    workspace = workspace_of(tmp_path)
    dataset = create_dataset(workspace, "busy", "image_classification").dataset
    store = DatasetStore(workspace)
    _open_import(store, store.record(dataset["name"]), [shapes])  # running, never worked on
    with pytest.raises(FailedPrecondition, match="has an import running"):
        import_data(workspace, bare(dataset), [str(shapes)])
    with pytest.raises(FailedPrecondition):
        delete_dataset(workspace, bare(dataset))
    with pytest.raises(UserError, match="only local paths"):
        import_data(workspace, bare(dataset), ["gs://bucket/data.csv"])


def test_a_cancelled_import_imports_nothing(tmp_path: Path, shapes: Path) -> None:
    from trainer.datasets import _open_import, create_dataset, get_dataset, run_import
    from trainer.store.catalog import Catalog
    from trainer.store.datasets import DatasetStore

    workspace = workspace_of(tmp_path)
    dataset = create_dataset(workspace, "cancelled", "image_classification").dataset
    store = DatasetStore(workspace)
    opened = _open_import(store, store.record(dataset["name"]), [shapes])
    assert opened.operation is not None
    Catalog(workspace.tracking_uri.reveal(), workspace.experiment_name).cancel(
        opened.operation.name
    )  # before its process looks: it stops at the first chunk of files
    ended = run_import(workspace, bare(dataset), [str(shapes)], bare(opened.operation.resource))
    assert ended["done"] and ended["error"]["code"] == 1
    assert "nothing was imported" in ended["error"]["message"]
    assert get_dataset(workspace, bare(dataset))["exampleCount"] == 0


def test_a_detached_import_ends_in_its_own_process(cli, shapes: Path, tmp_path: Path) -> None:
    dataset = created(cli)
    started = cli("datasets", "import", bare(dataset), shapes.as_uri(), "--detach")
    assert started.returncode == 0, started.stderr
    name = started.stdout.strip()
    first = operation(cli, name)  # on record before its process has begun
    assert not first["done"] and "importDataDetails" in first["metadata"]
    assert "log:" in started.stderr

    def ended() -> bool:
        return operation(cli, name)["done"]

    wait_for(ended, timeout=300)
    assert "error" not in operation(cli, name), (tmp_path / "home" / "imports").iterdir()
    assert get_dataset_count(cli, dataset) == 72


@pytest.mark.slow  # the MLflow server takes 10 to 20 s to start
def test_through_a_tracking_server(
    mlflow_server: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    shapes: Path,
) -> None:
    """Tags read through MLflow's REST API, the rows and stats downloaded from its artifacts."""
    from trainer.datasets import create_dataset, import_data, label_stats, list_datasets
    from trainer.store.datasets import rows_for_training

    workspace = Workspace(home=str(tmp_path / "home"), tracking_uri=mlflow_server,
                          experiment_name="remote")  # fmt: skip
    dataset = create_dataset(workspace, "remote", "image_classification").dataset
    assert "error" not in import_data(workspace, bare(dataset), [str(shapes)])
    assert [d["exampleCount"] for d in list_datasets(workspace)] == [72]
    assert label_stats(workspace, bare(dataset))["exampleCount"] == 72
    rows = rows_for_training(workspace, bare(dataset), "image_classification", None)
    assert rows.dataset_id == bare(dataset) and len(rows.path.read_text().splitlines()) == 72
    assert rows.classification_type == "MULTICLASS"


# -- training on a dataset ---------------------------------------------------------------------


def test_dataset_id_is_refused_before_anything_runs(tmp_path: Path, shapes: Path) -> None:
    from trainer.datasets import create_dataset, import_data
    from trainer.job.settings import checked_settings
    from trainer.settings import composed

    workspace = workspace_of(tmp_path)
    where = [f"home={workspace.home}", f"mlflow.tracking_uri={workspace.tracking_uri.reveal()}"]

    def check(*overrides: str, task: str = "image_classification") -> Any:
        return checked_settings(composed(task, "default", [*where, *overrides]))

    with pytest.raises(NotFound):
        check("dataset_id=ICN1234567890123456789")
    empty = bare(create_dataset(workspace, "empty", "image_classification").dataset)
    with pytest.raises(FailedPrecondition, match="no imported rows"):
        check(f"dataset_id={empty}")
    with pytest.raises(UserError, match="task=image_classification"):
        check(f"dataset_id={empty}", task="object_detection")
    with pytest.raises(UserError, match="both given"):
        check(f"dataset_id={empty}", f"dataset.path={shapes}")
    import_data(workspace, empty, [str(shapes)])
    settings = check(f"dataset_id=projects/local/locations/local/datasets/{empty}")
    assert settings.dataset_id == empty and settings.dataset.path is not None
    pinned = Path(settings.dataset.path)
    assert pinned.is_file() and str(shapes / "circle") in pinned.read_text()
    # A resumed training reads the copy it began with, whatever became of the dataset since.
    resumed = check(f"dataset_id={empty}", f"dataset.path={pinned}")
    assert resumed.dataset.path == str(pinned)
    kept = pinned.read_text()
    pinned.unlink()  # resumed on another machine: the same version from the store
    check(f"dataset_id={empty}", f"dataset.path={pinned}")
    assert pinned.read_text() == kept


def test_an_unknown_dataset_id_is_one_line(tmp_path: Path) -> None:
    result = run_trainer("dataset_id=ICN1234567890123456789", cwd=tmp_path, home=tmp_path)
    assert "is not in" in one_line_error(result)


@pytest.mark.slow
def test_a_detached_training_on_a_dataset_names_it(cli, shapes: Path, tmp_path: Path) -> None:
    """What the API server does: `dataset_id=ID detach=true`; the Model's datasetId is the ID."""
    dataset = created(cli)
    rows = labelled_rows(shapes, ["circle", "square", "cross"], ["TRAIN", "TRAIN", "VALIDATE",
                                                                "TEST"])  # fmt: skip
    cli("datasets", "import", bare(dataset), str(write_csv(tmp_path / "rows.csv", rows)))
    result = run_trainer(
        *FAST, f"dataset_id={bare(dataset)}", "detach=true", "display_name=from_dataset",
        "budget.train_budget_milli_node_hours=3", cwd=tmp_path, home=tmp_path / "home",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip()

    def ended() -> bool:  # on record once its process has loaded torch
        found = cli("operations", "get", name, "--json")
        return found.returncode == 0 and json.loads(found.stdout)["done"]

    wait_for(ended, timeout=600)
    training = operation(cli, name)
    assert "error" not in training, training
    model = json.loads(cli("models", "get", training["response"]["name"], "--json").stdout)
    assert model["datasetId"] == bare(dataset)
