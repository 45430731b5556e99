"""Deployed models answering online: `models deploy`, the API's :deploy, :predict and :undeploy
driven by Google's own clients, the model server's TF Serving route driven by a plain HTTP
client, each compared with batch prediction of the same images; refusals; a SIGTERM during a
burst; a restart of the API server with a deployed model."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST, REPO, Trained, read_json, run_trainer, train
from tests.server_helpers import (
    Server,
    batch_predicted,
    http,
    post,
    prediction_client,
    session_processes,
    start_server,
    wait_for,
)
from tests.test_export import run_snippet

MODEL_TYPE = "mobile-low-latency-1"
LOCAL = "projects/local/locations/local"


def model_id_of(model: dict) -> str:
    return model["name"].rsplit("/", 1)[1]


def images(folder: Path, count: int) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg", ".jpeg"))
    return found[:: max(1, len(found) // count)][:count]


def deployment_of(home: Path, model_id: str) -> dict[str, Any]:
    return read_json(home / "serve" / "deployments" / model_id / "deployment.json")


def tf_serving(url: str, paths: list[Path], headers: dict | None = None) -> tuple[int, dict, dict]:
    instances = [{"image_bytes": {"b64": b64(p.read_bytes())}, "key": str(i)}
                 for i, p in enumerate(paths)]  # fmt: skip
    return post(url + "/v1/models/default:predict", {"instances": instances}, headers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def automl_body(image: bytes, **params: str) -> dict[str, Any]:
    return {"payload": {"image": {"imageBytes": b64(image)}}, "params": params}


def assert_same_classification(online: list[dict], batch: list[dict]) -> None:
    assert [a["displayName"] for a in online] == [a["displayName"] for a in batch]
    for mine, theirs in zip(online, batch, strict=True):
        assert mine["annotationSpecId"] == theirs["annotationSpecId"]
        assert mine["classification"]["score"] == pytest.approx(
            theirs["classification"]["score"], abs=1e-5
        )


# -- a deployed classifier, through the API server ---------------------------------------


@pytest.fixture(scope="module")
def served(mobile_models: Trained, trainer_home: Path) -> Iterator[Server]:
    server = start_server(mobile_models.cwd, trainer_home, "--max-body-bytes", "65536")
    yield server
    server.stop()


@dataclass
class Deployed:
    name: str  # the Model's
    snippet_output: str  # what the README's online_predict.py printed for ``image``
    image: Path


@pytest.fixture(scope="module")
def deployed(
    served: Server, mobile_models: Trained, trainer_home: Path, tiny_shapes: Path, tmp_path_factory
) -> Iterator[Deployed]:
    """The model deployed, and one image predicted, by the README's snippet (Google's
    clients); undeployed at the end."""
    name = mobile_models.models[MODEL_TYPE]["name"]
    image = images(tiny_shapes, 1)[0]
    folder = tmp_path_factory.mktemp("snippet")
    shown = run_snippet("online_predict.py", folder, served.url, name, str(image))
    yield Deployed(name, shown, image)
    model_id = model_id_of(mobile_models.models[MODEL_TYPE])
    if served.client().get_model(name=name).deployment_state.name == "DEPLOYED":  # restarted
        ran = run_trainer("models", "undeploy", model_id, cwd=mobile_models.cwd, home=trainer_home)
        assert ran.returncode == 0, ran.stderr
    record = deployment_of(trainer_home, model_id)
    assert session_processes(record["pid"]) == []


def test_google_prediction_client_answers_as_batch_prediction(
    served: Server,
    deployed: Deployed,
    mobile_models: Trained,
    trainer_home: Path,
    tiny_shapes: Path,
) -> None:
    from google.cloud import automl_v1

    model = served.client().get_model(name=deployed.name)
    assert model.deployment_state == automl_v1.Model.DeploymentState.DEPLOYED
    assert model.image_classification_model_metadata.node_count == 1
    paths = images(tiny_shapes, 6)
    assert deployed.image in paths
    model_id = model_id_of({"name": deployed.name})
    batch = batch_predicted(mobile_models.cwd, trainer_home, model_id, paths)
    # The README's snippet printed the labels scoring 0.1 or more, best first.
    shown = [line.split("\t") for line in deployed.snippet_output.splitlines()]
    expected = [a for a in batch[str(deployed.image)]["annotations"]
                if a["classification"]["score"] >= 0.1]  # fmt: skip
    assert [label for label, _ in shown] == [a["displayName"] for a in expected]
    assert [float(score) for _, score in shown] == pytest.approx(
        [a["classification"]["score"] for a in expected], abs=1e-4
    )
    client = served.prediction_client()
    for path in paths:
        payload = automl_v1.ExamplePayload(image=automl_v1.Image(image_bytes=path.read_bytes()))
        answer = client.predict(
            name=deployed.name, payload=payload, params={"score_threshold": "0"}
        )
        online = [json.loads(type(a).to_json(a)) for a in answer.payload]
        assert_same_classification(online, batch[str(path)]["annotations"])
    # AutoML's default threshold, 0.5: the labels scoring under it are left out.
    answer = client.predict(name=deployed.name, payload=payload)
    expected = [a for a in batch[str(path)]["annotations"] if a["classification"]["score"] >= 0.5]
    assert [a.display_name for a in answer.payload] == [a["displayName"] for a in expected]


def test_tf_serving_route_answers_as_batch_prediction(
    deployed: Deployed, mobile_models: Trained, trainer_home: Path, tiny_shapes: Path
) -> None:
    model_id = model_id_of({"name": deployed.name})
    url = f"http://127.0.0.1:{deployment_of(trainer_home, model_id)['port']}"
    paths = images(tiny_shapes, 4)
    batch = batch_predicted(mobile_models.cwd, trainer_home, model_id, paths)
    status, answer, _ = tf_serving(url, paths)
    assert status == 200, answer
    for key, (path, prediction) in enumerate(zip(paths, answer["predictions"], strict=True)):
        assert prediction["key"] == str(key)
        expected = batch[str(path)]["annotations"]
        assert prediction["labels"] == [a["displayName"] for a in expected]
        assert prediction["scores"] == pytest.approx(
            [a["classification"]["score"] for a in expected], abs=1e-5
        )


def test_a_bad_image_fails_alone_in_its_batch(
    deployed: Deployed, trainer_home: Path, tiny_shapes: Path
) -> None:
    model_id = model_id_of({"name": deployed.name})
    url = f"http://127.0.0.1:{deployment_of(trainer_home, model_id)['port']}"
    good = images(tiny_shapes, 1)[0].read_bytes()
    route = f"{url}/v1/{deployed.name}:predict"
    for _ in range(5):  # until the bad image shares a batch (requests within 10 ms do)
        answers = at_once(route, [automl_body(b"these bytes are no image", score_threshold="0")]
                          + [automl_body(good, score_threshold="0")] * 7)  # fmt: skip
        status, bad, headers = answers[0]
        assert (status, bad["error"]["status"]) == (400, "INVALID_ARGUMENT")
        assert "no image" in bad["error"]["message"]
        assert all(status == 200 and answer["payload"] for status, answer, _ in answers[1:])
        if int(headers["x-batch-size"]) > 1:
            break
    else:
        pytest.fail("the bad image never shared a batch with the others")


def at_once(url: str, bodies: list[dict]) -> list[tuple[int, dict, dict]]:
    """Each body POSTed by a thread of its own, all released together."""
    answers: list[Any] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(number: int) -> None:
        start.wait()
        answers[number] = post(url, bodies[number])

    threads = [threading.Thread(target=send, args=(n,)) for n in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def test_refusals(
    served: Server, deployed: Deployed, mobile_models: Trained, tiny_shapes: Path
) -> None:
    image = images(tiny_shapes, 1)[0].read_bytes()
    body = automl_body(image)
    status, answer = http("POST", f"{served.url}/v1/{LOCAL}/models/ICN404:predict", body)
    assert (status, answer["error"]["status"]) == (404, "NOT_FOUND")
    other = mobile_models.models["mobile-versatile-1"]["name"]  # trained, never deployed
    status, answer = http("POST", f"{served.url}/v1/{other}:predict", body)
    assert (status, answer["error"]["status"]) == (400, "FAILED_PRECONDITION")
    assert "not deployed" in answer["error"]["message"]
    status, answer = http(
        "POST", f"{served.url}/v1/{deployed.name}:predict", automl_body(image * 40)
    )
    assert (status, answer["error"]["status"]) == (413, "RESOURCE_EXHAUSTED")
    status, answer = http("POST", f"{served.url}/v1/{deployed.name}:predict",
                          automl_body(image, score_threshold="2"))  # fmt: skip
    assert status == 400 and "score_threshold" in answer["error"]["message"]
    status, answer = http("POST", f"{served.url}/v1/{deployed.name}:predict", {"payload": {}})
    assert status == 400 and "imageBytes" in answer["error"]["message"]
    status, answer = http("POST", f"{served.url}/v1/{deployed.name}:undeploy", {"bogus": 1})
    assert status == 400  # Google's message type refuses an unknown field
    status, answer = http("POST", f"{served.url}/v1/{other}:undeploy", {})
    assert (status, answer["error"]["status"]) == (400, "FAILED_PRECONDITION")
    name = mobile_models.models["mobile-high-accuracy-1"]["name"]
    many = {"imageClassificationModelDeploymentMetadata": {"nodeCount": "99"}}
    status, answer = http("POST", f"{served.url}/v1/{name}:deploy", many)
    assert status == 400 and "nodeCount 99" in answer["error"]["message"]


@pytest.mark.slow  # two servers started again: 25 s
def test_sigterm_in_a_burst_then_a_restart_deploys_again(
    served: Server,
    deployed: Deployed,
    mobile_models: Trained,
    trainer_home: Path,
    tiny_shapes: Path,
) -> None:
    """Runs last of the deployed model's tests: its server is stopped, then the API server."""
    model_id = model_id_of({"name": deployed.name})
    record = deployment_of(trainer_home, model_id)
    url = f"http://127.0.0.1:{record['port']}"
    outcomes = burst_then_sigterm(url, record["pid"], images(tiny_shapes, 1)[0].read_bytes())
    answered = [o for o in outcomes if o == 200]
    refused = [o for o in outcomes if o in ("refused", "reset")]
    assert answered and len(answered) + len(refused) == len(outcomes), outcomes
    wait_for(lambda: not session_processes(record["pid"]), 30, "the server's processes to end")

    served.stop()  # and started again: the model on record as deployed answers again
    again = start_server(mobile_models.cwd, trainer_home, "--max-body-bytes", "65536")
    served.process, served.url = again.process, again.url
    body = automl_body(images(tiny_shapes, 1)[0].read_bytes())

    def answers() -> bool:
        return http("POST", f"{again.url}/v1/{deployed.name}:predict", body)[0] == 200

    wait_for(answers, 120, "the deployed model to answer after the restart")
    assert deployment_of(trainer_home, model_id)["pid"] != record["pid"]

    client = again.client()
    client.undeploy_model(name=deployed.name).result(timeout=120)
    model = client.get_model(name=deployed.name)
    assert model.deployment_state.name == "UNDEPLOYED"
    assert model.image_classification_model_metadata.node_count == 0
    assert session_processes(deployment_of(trainer_home, model_id)["pid"]) == []
    status, answer = http("POST", f"{again.url}/v1/{deployed.name}:predict", body)
    assert (status, answer["error"]["status"]) == (400, "FAILED_PRECONDITION")


def burst_then_sigterm(url: str, pid: int, image: bytes, requests: int = 60) -> list[Any]:
    """``requests`` clients sending one image each, 10 ms apart, and SIGTERM to the server once
    the first has been answered: each outcome, a status or how the connection was refused."""
    outcomes: list[Any] = [None] * requests
    first = threading.Event()
    body = json.dumps({"instances": [{"image_bytes": {"b64": b64(image)}}]}).encode()

    def send(number: int) -> None:
        time.sleep(number * 0.01)
        try:
            status, _, _ = post(url + "/v1/models/default:predict", body)
            outcomes[number] = status
            first.set()
        except urllib.error.URLError as error:
            reason = getattr(error, "reason", error)
            outcomes[number] = "refused" if isinstance(reason, ConnectionRefusedError) else reason
        except (ConnectionResetError, ConnectionAbortedError):
            outcomes[number] = "reset"
        except OSError as error:  # http.client's RemoteDisconnected, among others
            outcomes[number] = "reset" if "closed" in str(error) else repr(error)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(requests)]
    for thread in threads:
        thread.start()
    assert first.wait(60)
    os.kill(pid, signal.SIGTERM)
    for thread in threads:
        thread.join()
    return outcomes


# -- a deployed detector, and a video model ----------------------------------------------


@pytest.mark.slow  # a deployment of its own, 40 s on 2 cores
def test_a_deployed_detector_answers_with_batch_predictions_boxes(
    detection_model: Trained, trainer_home: Path, detection_csv: Path
) -> None:
    cwd, _, model, _ = detection_model.only()
    model_id = model_id_of(model)
    ran = run_trainer("models", "deploy", model_id, cwd=cwd, home=trainer_home)
    assert ran.returncode == 0, ran.stderr[-2000:]
    url = ran.stdout.strip().splitlines()[-1]
    try:
        paths = sorted((detection_csv.parent / "images").glob("*.png"))[:3]
        batch = batch_predicted(cwd, trainer_home, model_id, paths)
        from google.cloud import automl_v1

        client = prediction_client(url)  # the model's server answers AutoML's predict itself
        for path in paths:
            payload = automl_v1.ExamplePayload(image=automl_v1.Image(image_bytes=path.read_bytes()))
            params = {"score_threshold": "0", "max_bounding_box_count": "5"}
            answer = client.predict(name=model["name"], payload=payload, params=params)
            online = [json.loads(type(a).to_json(a)) for a in answer.payload]
            expected = batch[str(path)]["annotations"][:5]
            assert [a["displayName"] for a in online] == [a["displayName"] for a in expected]
            for mine, theirs in zip(online, expected, strict=True):
                box = mine["imageObjectDetection"]["boundingBox"]["normalizedVertices"]
                want = theirs["imageObjectDetection"]["boundingBox"]["normalizedVertices"]
                assert [v.get("x", 0.0) for v in box] == pytest.approx(
                    [v["x"] for v in want], abs=1e-4
                )
                assert [v.get("y", 0.0) for v in box] == pytest.approx(
                    [v["y"] for v in want], abs=1e-4
                )
        status, answer, _ = tf_serving(url, paths[:1])
        assert status == 200 and answer["predictions"][0]["num_detections"] >= 0
        assert set(answer["predictions"][0]) >= {"detection_boxes", "detection_scores",
                                                 "detection_classes", "detection_classes_as_text",
                                                 "num_detections", "key"}  # fmt: skip
    finally:
        pid = deployment_of(trainer_home, model_id)["pid"]
        ran = run_trainer("models", "undeploy", model_id, cwd=cwd, home=trainer_home)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert session_processes(pid) == []


def test_a_video_model_is_refused_naming_batch_prediction(
    video_model: Trained, trainer_home: Path
) -> None:
    cwd, _, model, _ = video_model.only()
    ran = run_trainer("models", "deploy", model_id_of(model), cwd=cwd, home=trainer_home)
    assert ran.returncode == 2 and "batch prediction" in ran.stderr.strip().splitlines()[-1]
    server = start_server(cwd, trainer_home)
    try:
        body = automl_body(b"not even a video")
        for method in (":predict", ":deploy"):
            status, answer = http("POST", f"{server.url}/v1beta1/{model['name']}{method}", body
                                  if method == ":predict" else {})  # fmt: skip
            assert (status, answer["error"]["status"]) == (400, "INVALID_ARGUMENT"), method
            assert "batch prediction" in answer["error"]["message"]
    finally:
        server.stop()


def test_deploy_after_training_is_refused_for_video_before_training(tmp_path: Path) -> None:
    ran = run_trainer("task=video_classification", "deploy_after_training=true",
                      cwd=tmp_path, home=tmp_path / "home")  # fmt: skip
    assert ran.returncode == 2, ran.stderr[-2000:]
    assert "batch only" in ran.stderr.strip().splitlines()[-1]
    assert not list(tmp_path.glob("runs/**/operation.json"))  # refused before any operation


# -- deploy after training, and delete ---------------------------------------------------


@pytest.mark.slow
def test_deploy_after_training_then_delete_undeploys_first(
    tmp_path: Path, trainer_home: Path, tiny_shapes: Path
) -> None:
    model, _ = train(tmp_path, trainer_home, *FAST, f"dataset.path={tiny_shapes}",
                     "budget.train_budget_milli_node_hours=4", "display_name=online",
                     "deploy_after_training=true")  # fmt: skip
    model_id = model_id_of(model)
    got = run_trainer("models", "get", model_id, "--json", cwd=tmp_path, home=trainer_home)
    stored = json.loads(got.stdout)
    assert stored["deploymentState"] == "DEPLOYED"
    assert stored["imageClassificationModelMetadata"]["nodeCount"] == "1"
    record = deployment_of(trainer_home, model_id)
    status, answer, _ = tf_serving(f"http://127.0.0.1:{record['port']}", images(tiny_shapes, 1))
    assert status == 200 and answer["predictions"][0]["labels"]
    ran = run_trainer("models", "delete", model_id, cwd=tmp_path, home=trainer_home)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert session_processes(record["pid"]) == []


# -- the model server by hand: its key and its body limit ------------------------------------


@pytest.mark.slow  # a deployment of its own, 40 s on 2 cores
def test_a_model_server_with_a_key_refuses_requests_without_it(
    mobile_models: Trained, trainer_home: Path, tiny_shapes: Path, tmp_path: Path, monkeypatch
) -> None:
    from trainer.serving.deployments import free_port, healthy
    from trainer.serving.package import write_package
    from trainer.store.catalog import Catalog
    from trainer.stored_model import trained_model

    monkeypatch.setenv("VISION_TRAINER_HOME", str(trainer_home))
    catalog = Catalog(f"sqlite:///{mobile_models.cwd / 'mlflow.db'}", "vision-trainer")
    model_id = model_id_of(mobile_models.models[MODEL_TYPE])
    package = write_package(trained_model(catalog, model_id, "a test"), tmp_path / "package")
    serving = [sys.executable, "-m", "trainer.serving", str(package)]
    open_to_all = subprocess.run([*serving, "--host", "0.0.0.0"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert open_to_all.returncode == 2 and "--api-key-file" in open_to_all.stderr

    (tmp_path / "key").write_text("k" * 24 + "\n")
    port = free_port()
    server = subprocess.Popen(
        [*serving, "--port", str(port), "--api-key-file", str(tmp_path / "key"),
         "--max-body-bytes", "20000", "--workers", "2"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "server.log").open("wb"), start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url), 120, "the model server's /health (open without the key)")
        image = images(tiny_shapes, 1)
        assert tf_serving(url, image)[0] == 401
        assert tf_serving(url, image, {"x-goog-api-key": "wrong" * 5})[0] == 401
        status, answer, _ = tf_serving(url, image, {"x-goog-api-key": "k" * 24})
        assert status == 200 and answer["predictions"][0]["labels"]
        big = {"instances": [{"image_bytes": {"b64": "A" * 30000}}]}
        key = {"x-goog-api-key": "k" * 24}
        status, answer, _ = post(url + "/v1/models/default:predict", big, key)
        assert (status, answer["error"]["status"]) == (413, "RESOURCE_EXHAUSTED")
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()[-2000:]
    wait_for(lambda: not session_processes(server.pid), 30, "no process of the server's left")
