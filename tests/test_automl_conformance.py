"""Every resource the project writes or prints parses strictly (unknown fields refused) into the
message types of Google's own AutoML client library, `google-cloud-automl` (a dev dependency):
v1 for images, v1beta1 for video, which has no v1 model.

The outputs are real: the session's short trainings of each task and the CLI's ``--json`` views
of them here; each task's batch prediction and export, where the tests that make them call
``check_batch_prediction_parses`` (test_predict.py, test_tasks_e2e.py) and
``check_export_operation_parses`` (test_export.py), so that no prediction or export runs twice.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from google.longrunning import operations_pb2
from google.protobuf import json_format
from google.rpc import status_pb2

from tests.conftest import LOCAL, read_json
from tests.test_manage import cli, cli_json, one_line_error
from trainer.errors import UserError
from trainer.store.automl import FIGURES, Operation, Parent, bare_id
from trainer.tasks import task_configs

TASKS = ["image_classification", "object_detection", "video_classification"]
FIXTURE = {
    "image_classification": "mobile_models",
    "object_detection": "detection_model",
    "video_classification": "video_model",
}


def automl(task: str) -> Any:
    """The client library's module of the task's API (google.cloud.automl_v1 or _v1beta1)."""
    return importlib.import_module(f"google.cloud.automl_{task_configs()[task]['automl_api']}")


# The library loads its message types lazily; an Any's @type resolves only once they are in.
for _task in TASKS:
    for _message in ("OperationMetadata", "Model", "BatchPredictResult"):
        getattr(automl(_task), _message).pb()


def strict(message: Any, data: dict[str, Any]) -> Any:
    """``data`` parsed into ``message`` (a protobuf class or a proto-plus type), refusing any
    field the type does not have; an ``Any`` must name its type."""
    pb_class = message.pb() if hasattr(message, "pb") else message
    return json_format.ParseDict(data, pb_class(), ignore_unknown_fields=False)


def parse_operation(task: str, operation: dict[str, Any], response: str | None) -> Any:
    """An Operation, its metadata unpacked as the task's OperationMetadata and its response as
    ``response`` (an AutoML message name, "Empty", or None for an unfinished operation)."""
    api = task_configs()[task]["automl_api"]
    parsed = strict(operations_pb2.Operation, operation)
    metadata = automl(task).OperationMetadata.pb()()
    assert parsed.metadata.Unpack(metadata), parsed.metadata.type_url
    assert parsed.metadata.type_url.endswith(f"automl.{api}.OperationMetadata")
    if response is not None:
        assert parsed.done and parsed.HasField("response")
        prefix = "google.protobuf." if response == "Empty" else f"google.cloud.automl.{api}."
        assert parsed.response.type_url == f"type.googleapis.com/{prefix}{response}"
    return parsed, metadata


def check_export_operation_parses(task: str, operation: dict[str, Any]) -> None:
    """For test_export.py: an export operation is AutoML's, with gcsOutputDirectory."""
    _, metadata = parse_operation(task, operation, "Empty")
    assert metadata.export_model_details.output_info.gcs_output_directory


@pytest.fixture(params=TASKS)
def task_model(request) -> tuple[str, Any]:
    return request.param, request.getfixturevalue(FIXTURE[request.param])


def test_models_operations_and_evaluations_parse(task_model) -> None:
    task, trained = task_model
    cwd = trained.cwd
    types = automl(task)
    for model_type, model in trained.models.items():
        run_dir = trained.run_dirs[model_type]
        assert model["name"].startswith(f"{LOCAL}/models/")
        # What the training printed and wrote.
        assert read_json(run_dir / "model.json") == model
        strict(types.Model, model)
        # What AutoML has no field for is beside the Model, every figure included.
        details = read_json(run_dir / "model_details.json")
        assert details["name"] == model["name"] and details["task"] == task
        assert set(FIGURES) <= set(details) and details["expireTime"] > model["createTime"]
        # The training's operation, done, its response the Model.
        operation = read_json(run_dir / "operation.json")
        assert operation["name"].startswith(f"{LOCAL}/operations/")
        parsed, metadata = parse_operation(task, operation, "Model")
        assert metadata.progress_percent == 100 and metadata.HasField("create_model_details")
        response = types.Model.pb()()
        assert parsed.response.Unpack(response) and response.name == model["name"]

    # What the CLI shows, for the ID in each of its forms; another parent is another model.
    model = next(iter(trained.models.values()))
    model_id = model["name"].rsplit("/", 1)[1]
    assert cli_json("models", "get", model_id, cwd=cwd) == model
    assert cli_json("models", "get", model["name"], cwd=cwd) == model
    other = f"projects/other/locations/local/models/{model_id}"
    assert "is not in" in one_line_error(cli("models", "get", other, cwd=cwd))
    evaluations = cli_json("models", "evaluations", f"models/{model_id}", cwd=cwd)
    assert evaluations["modelEvaluation"]
    strict(types.ListModelEvaluationsResponse, evaluations)
    for evaluation in evaluations["modelEvaluation"]:
        assert evaluation["name"].startswith(f"{model['name']}/modelEvaluations/")
    listed = cli_json("models", "list", cwd=cwd)
    assert {m["name"] for m in listed["model"]} >= {m["name"] for m in trained.models.values()}
    strict(types.ListModelsResponse, listed)
    # Every operation in the store: trainings, and whatever other tests predicted or exported.
    operations = cli_json("operations", "list", cwd=cwd)
    strict(operations_pb2.ListOperationsResponse, operations)
    for operation in operations["operations"]:
        parse_operation(task, operation, None)
    (training,) = [op for op in operations["operations"] if op["name"] == read_json(
        trained.run_dirs[next(iter(trained.models))] / "operation.json")["name"]]  # fmt: skip
    assert cli_json("operations", "get", training["name"].rsplit("/", 1)[1], cwd=cwd) == training


ANNOTATION_FILES = {
    "image_classification": "image_classification_*.jsonl",
    "object_detection": "image_object_detection_*.jsonl",
    "video_classification": "video_classification_*.json",
}


def annotations_of(folder: Path, pattern: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(folder.glob(pattern)):
        if path.suffix == ".json":  # video: one file per input row, a list of annotations
            found += json.loads(path.read_text())
        else:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                assert set(record) == {"ID", "annotations"}
                found += record["annotations"]
    return found


def check_batch_prediction_parses(
    task: str, cwd: Path, result: Any, input_csv: Path
) -> tuple[Any, dict[str, str]]:
    """For each task's prediction test (test_predict.py, test_tasks_e2e.py): the files and the
    operation of a finished `predict` are AutoML's. Returns the OperationMetadata, whose
    ``partial_failures`` the caller checks against the inputs it gave, and the result's
    metadata."""
    folder = Path(result.stdout.strip())
    annotations = annotations_of(folder, ANNOTATION_FILES[task])
    assert annotations
    for annotation in annotations:
        strict(automl(task).AnnotationPayload, annotation)
    for path in folder.glob("errors_*.jsonl"):
        for line in path.read_text().splitlines():
            strict(status_pb2.Status, json.loads(line)["errors"])
    (name,) = [line for line in result.stderr.splitlines() if "/operations/" in line]
    assert name.startswith(f"{LOCAL}/operations/")
    operation = cli_json("operations", "get", name, cwd=cwd)
    parsed, metadata = parse_operation(task, operation, "BatchPredictResult")
    details = metadata.batch_predict_details
    assert list(details.input_config.gcs_source.input_uris) == [str(input_csv)]
    assert details.output_info.gcs_output_directory == str(folder)
    prediction = automl(task).BatchPredictResult.pb()()
    assert parsed.response.Unpack(prediction)
    if task != "object_detection":
        assert dict(prediction.metadata) == {}
    return metadata, dict(prediction.metadata)


def test_readme_snippet_loads_a_model_and_its_operation(mobile_models, tmp_path: Path) -> None:
    from tests.test_export import run_snippet

    run_dir = next(iter(mobile_models.run_dirs.values()))
    for name in ("model.json", "operation.json"):
        shutil.copy(run_dir / name, tmp_path)
    model = read_json(run_dir / "model.json")
    shown = run_snippet("automl_resources.py", tmp_path).splitlines()
    stop_reason = model["imageClassificationModelMetadata"]["stopReason"]
    assert shown[0] == f"{model['name']} {stop_reason}"
    assert shown[1] == f"{read_json(run_dir / 'operation.json')['name']} True 100"


# -- records written before the resources were AutoML-exact ---------------------------------

OLD_ID = "ICN1111111111111111111"
OLD_MODEL = {  # as the project wrote a Model before: a short name and expireTime
    "name": f"models/{OLD_ID}",
    "displayName": "older",
    "datasetId": "d" * 16,
    "createTime": "2026-11-01T10:00:00.000000Z",
    "updateTime": "2026-11-01T10:01:00.000000Z",
    "expireTime": "2099-05-01T10:00:00.000000Z",
    "deploymentState": "UNDEPLOYED",
    "imageClassificationModelMetadata": {
        "baseModelId": "",
        "modelType": "mobile-low-latency-1",
        "trainBudgetMilliNodeHours": "6",
        "trainCostMilliNodeHours": "5",
        "stopReason": "BUDGET_REACHED",
        "nodeQps": 3.5,
        "nodeCount": "1",
    },
}
OLD_OPERATION = {
    "name": f"operations/{OLD_ID}",
    "metadata": {
        "createTime": "2026-11-01T10:00:00.000000Z",
        "updateTime": "2026-11-01T10:01:00.000000Z",
        "progressPercentage": 100,
        "createModelDetails": {},
    },
    "done": True,
    "response": OLD_MODEL,
}


def test_records_written_before_the_change_are_still_read(tmp_path: Path) -> None:
    """A store holding a model and an operation in the older shapes: every verb reads them."""
    from trainer.store.store import Store

    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "vision-trainer")
    # The older registry had no tags for the figures: they were in the Model's metadata.
    tags = {"model_id": OLD_ID, "expire_time": OLD_MODEL["expireTime"]}
    store.client.create_registered_model(OLD_ID, tags=tags, description=json.dumps(OLD_MODEL))
    run_id = store.start_run("older", {"operation": OLD_OPERATION["name"], "model_id": OLD_ID}, {})
    store.publish_operation(run_id, OLD_OPERATION, "SUCCEEDED")

    listing = cli("models", "list", cwd=tmp_path)
    assert listing.returncode == 0 and "mobile-low-latency-1" in listing.stdout
    assert "BUDGET_REACHED" in listing.stdout
    shown = cli("models", "get", f"models/{OLD_ID}", cwd=tmp_path).stdout
    assert "2099-05-01" in shown and "trainCostMilliNodeHours" in shown
    assert cli_json("models", "get", OLD_ID, cwd=tmp_path) == OLD_MODEL
    for given in (OLD_ID, f"operations/{OLD_ID}"):
        assert cli_json("operations", "get", given, cwd=tmp_path) == OLD_OPERATION
    table = cli("operations", "list", "--filter", f"worksOn=models/{OLD_ID}", cwd=tmp_path)
    assert OLD_ID in table.stdout and "100%" in table.stdout


def test_an_older_operation_file_is_brought_up_to_date_on_resume(tmp_path: Path) -> None:
    path = tmp_path / "operation.json"
    path.write_text(json.dumps({**OLD_OPERATION, "done": False, "response": None}))
    operation = Operation.reopen(path, OLD_OPERATION["name"], "v1")
    operation.progress(0.5)
    parsed, metadata = parse_operation("image_classification", read_json(path), None)
    assert parsed.name == f"operations/{OLD_ID}" and metadata.progress_percent == 50


def test_resource_names_and_their_parts() -> None:
    parent = Parent("my-project", "us-central1")
    name = parent.name("models", OLD_ID)
    assert name == f"projects/my-project/locations/us-central1/models/{OLD_ID}"
    assert Parent.of_name(name) == parent and Parent.of_name(f"models/{OLD_ID}") == Parent()
    for given in (OLD_ID, f"models/{OLD_ID}", name):
        assert bare_id(given, "models") == OLD_ID
    assert bare_id("../x/models/y", "models") == "../x/models/y"  # refused by the lookup
    with pytest.raises(UserError, match="automl.project"):
        Parent("a/b")


def test_partial_failures_stay_within_what_a_run_tag_holds() -> None:
    """An operation is also an MLflow run tag (8,000 characters at most): a prediction with
    thousands of long failed paths lists the first few, cut, and counts the rest."""
    from trainer.data.prediction import MAX_PARTIAL_FAILURES, PredictionResult, add_failure
    from trainer.predict import partial_failures

    failures: list[dict[str, Any]] = []
    for index in range(5000):
        add_failure(failures, 5, f"{'deep/' * 100}{index}.png: not found")
    result = PredictionResult(Path("out"), 1, 5000, [], [Path("errors_1.jsonl")], 1.0, failures)
    listed = partial_failures(result)
    assert len(listed) == MAX_PARTIAL_FAILURES + 1
    assert listed[-1]["message"] == f"{5000 - MAX_PARTIAL_FAILURES} more: see errors_1.jsonl"
    for failure in listed:
        strict(status_pb2.Status, failure)
    assert len(json.dumps(listed)) < 6000
