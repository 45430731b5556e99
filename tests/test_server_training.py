"""Trainings through `python -m trainer serve`, as AutoML's documented samples run them: Google's
own client over REST (only its construction differs from the samples) and one request with a
body exactly as the REST documentation shows it, sent with a plain HTTP client."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.cloud import automl_v1 as automl

from tests.conftest import FAST, LOCAL, run_trainer
from tests.server_helpers import Server, http, start_server, wait_for
from tests.test_export import run_snippet
from trainer.tasks.image_classification.demo import write_shapes

LABELS = ("circle", "square", "triangle")
# The trainings' defaults: small and quick (tests/conftest.py's FAST), with the reserves for
# recording measured as a user's are (FAST's fixed 4 s is overrun on a loaded machine).
DEFAULTS = [*FAST, "budget.save_reserve_seconds=auto"]
UNTIL_SPENT = ["budget.disable_early_stopping=true"]


def shapes_csv(data: Path) -> Path:
    """``path,label`` rows of three labels of generated 32-pixel shapes, 24 images each."""
    write_shapes(data / "shapes", per_label=24, size=32, seed=7)
    rows = [
        [str(f), label] for label in LABELS for f in sorted((data / "shapes" / label).iterdir())
    ]
    path = data / "shapes.csv"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def serve(cwd: Path, *defaults: str) -> Server:
    for folder in ("data", "out"):
        (cwd / folder).mkdir(exist_ok=True)
    return start_server(cwd, cwd / "home", "--data-root", "data", "--output-root", "out",
                        *DEFAULTS, *defaults)  # fmt: skip


def create_and_import(client, source: Path) -> str:
    """AutoML's "create a dataset" and "import items" samples; the dataset's name."""
    metadata = automl.ImageClassificationDatasetMetadata(
        classification_type=automl.ClassificationType.MULTICLASS
    )
    dataset = automl.Dataset(display_name="shapes", image_classification_dataset_metadata=metadata)
    created = client.create_dataset(parent=LOCAL, dataset=dataset).result(timeout=60)
    input_config = automl.InputConfig(gcs_source=automl.GcsSource(input_uris=[str(source)]))
    client.import_data(name=created.name, input_config=input_config).result(timeout=300)
    return created.name


def operation_names(client) -> set[str]:
    listed = client._transport.operations_client.list_operations(name=LOCAL, filter_="")
    return {operation.name for operation in listed}


@pytest.mark.slow
def test_automls_samples_run_against_the_server(tmp_path: Path) -> None:
    server = serve(tmp_path)
    try:
        client = server.client()
        dataset_name = create_and_import(client, shapes_csv(tmp_path / "data"))
        dataset = client.get_dataset(name=dataset_name)
        assert dataset.example_count == 72
        status, stats = http("GET", f"{server.url}/v1/{dataset_name}:labelStats")
        assert status == 200 and stats["exampleCount"] == 72
        assert sorted(label["displayName"] for label in stats["labels"]) == sorted(LABELS)
        assert {item["code"] for item in stats["advice"]} == {"FEW_EXAMPLES"}  # 24 < 100
        assert [d.name for d in client.list_datasets(parent=LOCAL)] == [dataset_name]

        # AutoML's "create a model" sample, and its wait on the operation.
        metadata = automl.ImageClassificationModelMetadata(
            model_type="mobile-low-latency-1", train_budget_milli_node_hours=8
        )
        model = automl.Model(display_name="shapes_model", dataset_id=dataset_name.split("/")[-1],
                             image_classification_model_metadata=metadata)  # fmt: skip
        response = client.create_model(parent=LOCAL, model=model)
        assert response.operation.name in operation_names(client)  # listed at once
        trained = response.result(timeout=600)
        figures = trained.image_classification_model_metadata
        assert 0 < figures.train_cost_milli_node_hours <= 8
        assert trained.dataset_id == dataset_name.split("/")[-1]

        operations = client._transport.operations_client
        ended = operations.get_operation(name=response.operation.name)
        assert ended.done and not ended.error.code
        assert client.get_model(name=trained.name).display_name == "shapes_model"
        assert [m.name for m in client.list_models(parent=LOCAL)] == [trained.name]
        shown = run_snippet("automl_api.py", tmp_path, server.url)  # the README's sample
        assert f"Model name: {trained.name}" in shown.splitlines()
        evaluations = list(client.list_model_evaluations(parent=trained.name, filter=""))
        assert len(evaluations) == 1 + len(LABELS)  # overall and one per label
        one = client.get_model_evaluation(name=evaluations[0].name)
        assert one.name == evaluations[0].name

        # Batch prediction (PredictionServiceClient) and export, each an operation.
        images = sorted((tmp_path / "data" / "shapes" / "circle").iterdir())[:3]
        (tmp_path / "data" / "predict.csv").write_text("".join(f"{p}\n" for p in images))
        predicted = (
            server.prediction_client()
            .batch_predict(
                name=trained.name,
                input_config={"gcs_source": {"input_uris": ["data/predict.csv"]}},
                output_config={"gcs_destination": {"output_uri_prefix": "out"}},
                params={"score_threshold": "0.0"},
            )
            .result(timeout=300)
        )
        assert predicted is not None
        (results,) = (tmp_path / "out").glob("prediction-shapes_model-*/*.jsonl")
        assert len(results.read_text().splitlines()) == 3
        tf_js = {"modelFormat": "tf_js", "gcsDestination": {"outputUriPrefix": "out"}}
        status, refused = http("POST", f"{server.url}/v1/{trained.name}:export",
                               {"outputConfig": tf_js})  # fmt: skip
        assert (status, refused["error"]["status"]) == (400, "INVALID_ARGUMENT")
        message = refused["error"]["message"]
        assert "no maintained converter" in message
        assert message.endswith("offered are onnx, torchscript, tflite, docker")
        client.export_model(
            name=trained.name,
            output_config={"model_format": "onnx",
                           "gcs_destination": {"output_uri_prefix": "out/exports"}},
        ).result(timeout=300)  # fmt: skip
        assert list((tmp_path / "out" / "exports").rglob("model.onnx"))

        # The CLI lists what the server lists, from the same store.
        cli = run_trainer("models", "list", "--json", cwd=tmp_path, home=tmp_path / "home")
        assert [m["name"] for m in json.loads(cli.stdout)["model"]] == [trained.name]
        cli = run_trainer("operations", "list", "--json", "--all", cwd=tmp_path,
                          home=tmp_path / "home")  # fmt: skip
        assert {op["name"] for op in json.loads(cli.stdout)["operations"]} == operation_names(
            client
        )

        status, waited = http("POST", f"{server.url}/v1/{response.operation.name}:wait",
                              {"timeout": "5s"})  # fmt: skip
        assert status == 200 and waited["done"] and waited["response"]["name"] == trained.name

        # DeleteOperation: the result is no longer wanted, so no longer listed or found; the
        # model it made stays.
        operations.delete_operation(name=response.operation.name)
        with pytest.raises(exceptions.NotFound):
            operations.get_operation(name=response.operation.name)
        assert response.operation.name not in operation_names(client)
        deleted = client.delete_model(name=trained.name)
        deleted.result(timeout=60)
        with pytest.raises(exceptions.NotFound):
            client.get_model(name=trained.name)
    finally:
        server.stop()


@pytest.mark.slow
def test_trainings_go_on_across_a_restart_and_a_cancel_is_on_record(tmp_path: Path) -> None:
    # Each training runs to its budget (tiny data converges within seconds): one is still
    # training when it is cancelled.
    server = serve(tmp_path, *UNTIL_SPENT)
    client = server.client()
    dataset_id = create_and_import(client, shapes_csv(tmp_path / "data")).split("/")[-1]
    # The REST documentation's body, sent as it shows it (a plain HTTP client).
    body = {
        "displayName": "first",
        "datasetId": dataset_id,
        "imageClassificationModelMetadata": {
            "modelType": "mobile-low-latency-1",
            "trainBudgetMilliNodeHours": "8",
        },
    }
    status, first = http("POST", f"{server.url}/v1/{LOCAL}/models", body)
    assert status == 200, first
    long_budget = {"train_budget_milli_node_hours": 100}
    model = {"display_name": "second", "dataset_id": dataset_id,
             "image_classification_model_metadata": long_budget}  # fmt: skip
    second = client.create_model(parent=LOCAL, model=model).operation.name
    assert {first["name"], second} <= operation_names(client)  # both, at once
    operations = client._transport.operations_client
    # A cancel before the training has its operation on record reaches it once it has.
    model = {**model, "display_name": "third"}
    third = client.create_model(parent=LOCAL, model=model).operation.name
    operations.cancel_operation(name=third)

    def training(name: str) -> bool:
        """On record by its own process, and past its first steps."""
        found = operations.get_operation(name=name)
        return automl.OperationMetadata.deserialize(found.metadata.value).progress_percent > 0

    wait_for(lambda: training(first["name"]) and training(second), 240, "both trainings")
    server.stop(signal.SIGKILL)
    server = serve(tmp_path, *UNTIL_SPENT)
    try:
        client = server.client()
        operations = client._transport.operations_client
        assert {first["name"], second} <= operation_names(client)
        operations.cancel_operation(name=second)
        cancelled = wait_for(lambda: _done(operations, second), 120, "the cancel")
        assert cancelled.error.code == 1  # CANCELLED
        assert "cost so far" in cancelled.error.message
        assert wait_for(lambda: _done(operations, third), 120, "the early cancel").error.code == 1
        finished = wait_for(lambda: _done(operations, first["name"]), 300, "the first training")
        assert not finished.error.code
        model = automl.Model.deserialize(finished.response.value)
        assert model.display_name == "first"
        assert model.image_classification_model_metadata.train_cost_milli_node_hours <= 8
    finally:
        server.stop()


def _done(operations, name: str):
    found = operations.get_operation(name=name)
    return found if found.done else None
