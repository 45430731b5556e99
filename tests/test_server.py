"""`python -m trainer serve`: AutoML's REST API as a real server process on 127.0.0.1, driven by
Google's own client over REST and by a plain HTTP client. These tests train nothing (the
trainings through the API are in test_server_training.py)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.auth.exceptions import InvalidOperation

from tests.conftest import LOCAL, run_trainer
from tests.server_helpers import Server, http, start_server

MODELS = f"/v1/{LOCAL}/models"
KEY = "k3y-for-the-tests-0123456789"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cwd = tmp_path_factory.mktemp("served")
    for folder in ("data", "out"):
        (cwd / folder).mkdir()
    server = start_server(cwd, cwd / "home", "--data-root", "data", "--output-root", "out",
                          "--max-body-bytes", "4096", "budget.min_milli_node_hours=1")  # fmt: skip
    yield server
    server.stop()


def created_nothing(server: Server) -> None:
    """No operation listed, no run directory, nothing in the store: nothing billed."""
    status, listed = http("GET", f"{server.url}/v1/{LOCAL}/operations")
    assert (status, listed) == (200, {})
    assert not (server.cwd / "runs").exists()
    assert not (server.cwd / "mlflow.db").exists()


BAD_BODIES = {
    "an unknown model type": (
        {"displayName": "d", "imageClassificationModelMetadata": {"modelType": "tiny-1"}},
        "modelType 'tiny-1' is not one of image_classification's",
    ),
    "a budget over the type's bounds": (
        {
            "displayName": "d",
            "imageClassificationModelMetadata": {"trainBudgetMilliNodeHours": "9999999"},
        },
        "budget.train_budget_milli_node_hours=9999999 is outside the bounds",
    ),  # fmt: skip
    "an unknown field": (
        {"displayName": "d", "imageClassificationModelMetadata": {}, "budget": "1"},
        'has no field named "budget"',
    ),
    "an unknown field in the metadata": (
        {"displayName": "d", "imageClassificationModelMetadata": {"epochs": 3}},
        'has no field named "epochs"',
    ),
    "no task's metadata": ({"displayName": "d"}, "give the model one of"),
    "a display name AutoML refuses": (
        {"displayName": "two words", "imageClassificationModelMetadata": {}},
        "display_name 'two words' is invalid",
    ),
    "a video model through v1": (
        {"displayName": "d", "videoClassificationModelMetadata": {}},
        'has no field named "videoClassificationModelMetadata"',
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_a_bad_model_is_invalid_argument_and_costs_nothing(served: Server, case: str) -> None:
    body, message = BAD_BODIES[case]
    status, answer = http("POST", served.url + MODELS, body)
    assert status == 400, answer
    assert answer["error"]["status"] == "INVALID_ARGUMENT"
    assert message in answer["error"]["message"]
    assert "\n" not in answer["error"]["message"]
    created_nothing(served)


def test_video_comes_through_v1beta1_as_automl_video_had_it(tmp_path: Path) -> None:
    """v1beta1's Model and Dataset have the video metadata v1 lacks: the body parses, and the
    video task's own checks answer."""
    served = start_server(tmp_path, tmp_path / "home")
    body = {"displayName": "two words", "videoClassificationModelMetadata": {}}
    status, answer = http("POST", f"{served.url}/v1beta1/{LOCAL}/models", body)
    assert status == 400 and "display_name 'two words' is invalid" in answer["error"]["message"]
    clips = {"displayName": "clips", "videoClassificationDatasetMetadata": {}}
    status, dataset = http("POST", f"{served.url}/v1beta1/{LOCAL}/datasets", clips)
    assert status == 200 and dataset["name"].startswith(f"{LOCAL}/datasets/VCN"), dataset
    status, answer = http("GET", f"{served.url}/v1beta1/{dataset['name']}")
    assert (status, answer) == (200, dataset)
    status, answer = http("DELETE", f"{served.url}/v1beta1/{dataset['name']}")
    assert status == 200 and answer["done"]
    assert http("GET", f"{served.url}/v1beta1/{dataset['name']}")[0] == 404
    served.stop()


def test_googles_client_raises_on_a_bad_model(served: Server) -> None:
    """Over REST, google-api-core raises the HTTP status's class (BadRequest, the parent of
    InvalidArgument); the status name is in the answer."""
    model = {"display_name": "d", "image_classification_model_metadata": {"model_type": "x"}}
    with pytest.raises(exceptions.BadRequest, match="modelType 'x' is not one of") as raised:
        served.client().create_model(parent=LOCAL, model=model)
    assert raised.value.response.json()["error"]["status"] == "INVALID_ARGUMENT"
    created_nothing(served)


def test_a_missing_model_or_operation_is_not_found(served: Server) -> None:
    client = served.client()
    with pytest.raises(exceptions.NotFound, match="ICN404"):
        client.get_model(name=f"{LOCAL}/models/ICN404")
    with pytest.raises(exceptions.NotFound):
        client.delete_model(name=f"{LOCAL}/models/ICN404")
    with pytest.raises(exceptions.NotFound):
        client._transport.operations_client.get_operation(name=f"{LOCAL}/operations/ICN404")
    status, answer = http("GET", f"{served.url}/v1/{LOCAL}/models/ICN404/modelEvaluations")
    assert (status, answer["error"]["status"]) == (404, "NOT_FOUND")
    created_nothing(served)


@pytest.mark.parametrize(
    ("method", "body", "field"),
    [
        (":batchPredict",
         {"inputConfig": {"gcsSource": {"inputUris": ["/etc/passwd"]}},
          "outputConfig": {"gcsDestination": {"outputUriPrefix": "out"}}},
         "inputConfig.gcsSource.inputUris '/etc/passwd' is outside the server's --data-root"),
        (":batchPredict",
         {"inputConfig": {"gcsSource": {"inputUris": ["data/in.csv"]}},
          "outputConfig": {"gcsDestination": {"outputUriPrefix": "file:///tmp"}}},
         "outputUriPrefix 'file:///tmp' is outside the server's --output-root"),
        (":export",
         {"outputConfig": {"gcsDestination": {"outputUriPrefix": "data/../../x"}}},
         "is outside the server's --output-root"),
    ],
)  # fmt: skip
def test_a_path_outside_the_roots_is_permission_denied(
    served: Server, method: str, body: dict, field: str
) -> None:
    status, answer = http("POST", f"{served.url}{MODELS}/ICN1{method}", body)
    assert (status, answer["error"]["status"]) == (403, "PERMISSION_DENIED"), answer
    assert field in answer["error"]["message"]
    created_nothing(served)


def test_a_symlink_out_of_the_roots_is_permission_denied(served: Server) -> None:
    link = served.cwd / "data" / "elsewhere"
    link.symlink_to("/etc")
    body = {"inputConfig": {"gcsSource": {"inputUris": [str(link / "hosts")]}},
            "outputConfig": {"gcsDestination": {"outputUriPrefix": "out"}}}  # fmt: skip
    status, answer = http("POST", f"{served.url}{MODELS}/ICN1:batchPredict", body)
    assert (status, answer["error"]["status"]) == (403, "PERMISSION_DENIED")
    assert "is outside the server's --data-root" in answer["error"]["message"]


def test_a_body_over_the_limit_is_413(served: Server) -> None:
    body = {"displayName": "d" * 5000, "imageClassificationModelMetadata": {}}
    status, answer = http("POST", served.url + MODELS, body)
    assert (status, answer["error"]["status"]) == (413, "RESOURCE_EXHAUSTED")
    assert "4096 bytes" in answer["error"]["message"]
    created_nothing(served)


def test_what_is_not_a_method_is_unimplemented(served: Server) -> None:
    for method in (":deploy", ":undeploy", ":predict"):  # a model that is not there
        status, answer = http("POST", f"{served.url}{MODELS}/ICN1{method}", {})
        assert (status, answer["error"]["status"]) == (404, "NOT_FOUND"), method
    status, answer = http("PUT", f"{served.url}{MODELS}/ICN1", {})
    assert (status, answer["error"]["status"]) == (501, "UNIMPLEMENTED")
    status, answer = http("GET", f"{served.url}/v2/{LOCAL}/models")
    assert (status, answer["error"]["status"]) == (404, "NOT_FOUND")


def test_with_a_key_every_request_needs_it(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    server = start_server(tmp_path, tmp_path / "home", "--api-key-file", str(tmp_path / "key"))
    try:
        # google-auth answers a 401 by refreshing the credentials, which anonymous ones cannot:
        # Google's client gives up there, before it raises Unauthorized.
        with pytest.raises(InvalidOperation, match="Anonymous credentials cannot be refreshed"):
            server.client().list_models(parent=LOCAL)
        status, answer = http("GET", f"{server.url}/v1/{LOCAL}/models")
        assert (status, answer["error"]["status"]) == (401, "UNAUTHENTICATED")
        assert "needs its API key" in answer["error"]["message"]
        status, answer = http("GET", f"{server.url}/v1/{LOCAL}/models",
                              headers={"x-goog-api-key": KEY[:-1] + "X"})  # fmt: skip
        assert (status, answer["error"]["status"]) == (401, "UNAUTHENTICATED")
        status, _ = http("POST", f"{server.url}/v1/{LOCAL}/models", {"displayName": "d"})
        assert status == 401
        assert list(server.client(api_key=KEY).list_models(parent=LOCAL)) == []
        status, answer = http("GET", f"{server.url}/v1/{LOCAL}/operations",
                              headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
        assert (status, answer) == (200, {})
        assert http("GET", f"{server.url}/health")[0] == 200  # readiness tells nothing
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "0.0.0.0"], "reachable from other machines: give --api-key-file"),
        (["--api-key-file", "/nonexistent"], "--api-key-file /nonexistent: give a file"),
        (["model_type=tiny-1"], "model_type"),
        (["budget.train_budget_milli_node_hours=0"], "outside the bounds"),
    ],
)
def test_a_server_that_would_be_unsafe_or_wrong_does_not_start(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run_trainer("serve", "--port", "0", *args, cwd=tmp_path, home=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_server_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    server = start_server(tmp_path, tmp_path / "home")
    assert http("GET", f"{server.url}/health") == (200, {"status": "ok"})
    server.stop()
    # uvicorn shuts down gracefully, then raises the signal again so that the exit says why.
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert "Traceback" not in (tmp_path / "server.log").read_text()
    with pytest.raises(OSError):  # nothing listens any more
        http("GET", f"{server.url}/health")


def test_a_model_trained_further_is_checked_as_its_base_models_type(tmp_path: Path) -> None:
    """No modelType: the base model's (as `python -m trainer base_model_id=...`), whose
    bounds the budget must fit; a cloud type's least is 8,000 milli-node-hours."""
    from tests.test_registry_records import FIGURES_OF_NEW
    from trainer.store.reader import MODEL_TAG
    from trainer.store.store import Store, metadata_tags

    base = {"name": f"{LOCAL}/models/ICN1234567890123456789", "displayName": "base",
            "datasetId": "", "createTime": "2026-12-01T00:00:00Z",
            "imageClassificationModelMetadata": {}}  # fmt: skip
    details = {**FIGURES_OF_NEW, "modelType": "cloud",
               "expireTime": "2099-01-01T00:00:00.000000Z"}  # fmt: skip
    tags = {**metadata_tags(base, details), MODEL_TAG: json.dumps(base)}
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "vision-trainer")
    store.client.create_registered_model(tags["model_id"], tags=tags)
    served = start_server(tmp_path, tmp_path / "home")
    try:
        body = {
            "displayName": "further",
            "imageClassificationModelMetadata": {
                "baseModelId": "ICN1234567890123456789",
                "trainBudgetMilliNodeHours": "2000",
            },
        }
        status, answer = http("POST", served.url + MODELS, body)
        assert status == 400, answer
        assert "outside the bounds [8000, 800000]" in answer["error"]["message"]
        status, answer = http(
            "POST",
            served.url + MODELS,
            {
                **body,
                "imageClassificationModelMetadata": {
                    "baseModelId": "ICN404",
                    "trainBudgetMilliNodeHours": "2000",
                },
            },
        )
        assert (status, answer["error"]["status"]) == (404, "NOT_FOUND")
        assert not (tmp_path / "runs").exists()
    finally:
        served.stop()


def test_the_store_of_tracking_uri_is_every_requests(tmp_path: Path) -> None:
    """--tracking-uri and --experiment name the store of every request: datasets, models and
    the trainings the server starts (told through MLFLOW_TRACKING_URI)."""
    store = f"sqlite:///{tmp_path / 'other.db'}"
    served = start_server(tmp_path, tmp_path / "home",
                          store=("--tracking-uri", store, "--experiment", "elsewhere"))  # fmt: skip
    try:
        status, created = http("POST", f"{served.url}/v1/{LOCAL}/datasets", {
            "displayName": "shapes", "imageObjectDetectionDatasetMetadata": {}})  # fmt: skip
        assert status == 200, created
    finally:
        served.stop()
    assert (tmp_path / "other.db").is_file() and not (tmp_path / "mlflow.db").exists()
    listed = run_trainer("--tracking-uri", store, "--experiment", "elsewhere", "datasets",
                         "list", "--json", cwd=tmp_path, home=tmp_path / "home")  # fmt: skip
    assert created["response"]["name"] in listed.stdout, listed.stderr
