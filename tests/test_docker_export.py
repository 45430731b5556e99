"""`models export --format docker`: the folder an image is built from, and its entrypoint run
directly (Docker cannot build here: no daemon, no network to pull the base image) with the
project's copy the folder ships, answering TF Serving's and AutoML's predict as batch prediction
does, then ended by SIGTERM; a video model refused in one line."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Trained, read_json, run_trainer
from tests.server_helpers import batch_predicted, post, session_processes
from tests.test_manage import one_line_error
from trainer.data.manifest import TEST, read_dataset
from trainer.serving.deployments import free_port, healthy

MODEL_TYPE = "mobile-low-latency-1"
KEY = "a-key-of-sixteen-or-more"


def model_id_of(model: dict) -> str:
    return model["name"].rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def exported(mobile_models: Trained, trainer_home: Path, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("docker")
    ran = run_trainer("models", "export", model_id_of(mobile_models.models[MODEL_TYPE]),
                      "--format", "docker", "--output", str(output),
                      cwd=mobile_models.cwd, home=trainer_home)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "docker build -t vision-trainer-icn" in ran.stderr
    return Path(ran.stdout.strip())


def test_the_export_holds_the_package_the_project_and_the_image_files(
    mobile_models: Trained, exported: Path
) -> None:
    model = mobile_models.models[MODEL_TYPE]
    assert exported.name.startswith(f"model-export-{model['displayName']}-")
    assert {p.name for p in exported.iterdir()} == {
        "model", "app", "Dockerfile", "entrypoint.sh", "metadata.json",
    }  # fmt: skip
    assert {p.name for p in (exported / "model").iterdir()} == {"serving.json", "model.ckpt"}
    app = exported / "app"
    assert {p.name for p in app.iterdir()} == {
        "pyproject.toml", "requirements.lock", "README.md", "conf",
        "trainer", "budgets", "evaluation", "hydra_plugins",
    }  # fmt: skip
    assert not list(app.rglob("__pycache__"))
    assert os.access(exported / "entrypoint.sh", os.X_OK)
    dockerfile = (exported / "Dockerfile").read_text()
    for line in ("FROM python:3.11-slim", "EXPOSE 8080", 'ENTRYPOINT ["/srv/entrypoint.sh"]',
                 "RUN pip install --require-hashes -r app/requirements.lock",
                 "RUN pip install --no-deps --no-build-isolation -e app"):  # fmt: skip
        assert line in dockerfile.splitlines()
    meta = read_json(exported / "metadata.json")
    assert meta["format"] == "docker" and meta["task"] == "image_classification"
    assert meta["modelId"] == model_id_of(model) and meta["modelType"] == MODEL_TYPE
    assert meta["verification"]["parameters"] > 0


def test_the_entrypoint_environment_imports_the_folders_copy(exported: Path, tmp_path) -> None:
    env = entrypoint_env(exported, tmp_path)
    ran = subprocess.run([sys.executable, "-c", "import trainer; print(trainer.CONF_DIR)"],
                         env=env, cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert Path(ran.stdout.strip()) == exported / "app" / "conf", ran.stderr


@pytest.mark.slow  # a server of its own: 20 s
def test_the_entrypoint_serves_as_batch_prediction_and_ends_on_sigterm(
    mobile_models: Trained, trainer_home: Path, tiny_shapes: Path, exported: Path, tmp_path: Path
) -> None:
    model = mobile_models.models[MODEL_TYPE]
    model_id = model_id_of(model)
    image = read_dataset(tiny_shapes).split(TEST)[0].path
    (tmp_path / "key").write_text(KEY + "\n")
    # 127.0.0.1: nothing of the test machine is exposed; the key file's variable is still tested.
    env = entrypoint_env(exported, tmp_path, HOST="127.0.0.1", API_KEY_FILE=str(tmp_path / "key"))
    with running_entrypoint(exported, env, tmp_path) as (server, url):
        # exec: the entrypoint's process is the model server itself.
        assert "trainer.serving" in Path(f"/proc/{server.pid}/cmdline").read_text()
        route = f"{url}/v1/models/default:predict"
        assert post(route, tf_serving_body(image))[0] == 401  # no key
        status, answer, _ = post(route, tf_serving_body(image), {"x-goog-api-key": KEY})
        assert status == 200, answer
        every_label = {"score_threshold": "0"}
        body = {"payload": {"image": {"imageBytes": b64(image)}}, "params": every_label}
        status, automl, _ = post(f"{url}/v1/{model['name']}:predict", body, {"x-goog-api-key": KEY})
        assert status == 200, automl

        found = batch_predicted(mobile_models.cwd, trainer_home, model_id, [image])
        batch = found[str(image)]["annotations"]
        (prediction,) = answer["predictions"]
        assert prediction["key"] == "1"
        assert prediction["labels"] == [a["displayName"] for a in batch]
        scores = [a["classification"]["score"] for a in batch]
        assert prediction["scores"] == pytest.approx(scores, abs=1e-5)
        assert [a["annotationSpecId"] for a in automl["payload"]] == [
            a["annotationSpecId"] for a in batch
        ]
        got = [a["classification"]["score"] for a in automl["payload"]]
        assert got == pytest.approx(scores, abs=1e-5)

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert session_processes(server.pid) == []  # its workers ended before it did


def test_the_entrypoint_wants_a_key_on_every_interface(exported: Path, tmp_path: Path) -> None:
    """HOST is 0.0.0.0 by default, as a container needs: without API_KEY_FILE the server does
    not start."""
    ran = subprocess.run(
        ["bash", str(exported / "entrypoint.sh")], env=entrypoint_env(exported, tmp_path),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    refusal = one_line_error(ran)
    assert "--host 0.0.0.0 is reachable from other machines: give --api-key-file" in refusal


def test_a_video_model_is_refused_naming_batch_prediction(
    video_model: Trained, trainer_home: Path, tmp_path: Path
) -> None:
    cwd, _, model, _ = video_model.only()
    ran = run_trainer("models", "export", model_id_of(model), "--format", "docker",
                      "--output", str(tmp_path), cwd=cwd, home=trainer_home)  # fmt: skip
    line = one_line_error(ran)
    assert "predicts in batch only" in line and "use batch prediction" in line
    assert "export it as onnx or torchscript" in line
    assert list(tmp_path.iterdir()) == []


# -- helpers ----------------------------------------------------------------------------------


def entrypoint_env(exported: Path, home: Path, **variables: str) -> dict[str, str]:
    """The entrypoint's variables outside the image: this interpreter, a free port, and the
    folder's copy of the project first on the path (as the image installs it), not the repo's."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "VISION_TRAINER_HOME": str(home / "home"),
        "TORCH_HOME": os.environ.get("TORCH_HOME", str(home / "torch")),
        "PYTHONPATH": str(exported / "app"),
        "PYTHON": sys.executable,
        "PORT": str(free_port()),
        **variables,
    }


@contextmanager
def running_entrypoint(
    exported: Path, env: dict[str, str], folder: Path
) -> Iterator[tuple[subprocess.Popen, str]]:
    """``entrypoint.sh`` run in a session of its own, answering /health; its session is killed
    on leaving if anything of it is left (a failed test)."""
    log, url = folder / "server.log", f"http://127.0.0.1:{env['PORT']}"
    with log.open("w") as output:
        process = subprocess.Popen(["bash", str(exported / "entrypoint.sh")], env=env,
                                   cwd=folder, stdout=output, stderr=output,
                                   start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not healthy(url):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no /health in 180 s"
            time.sleep(0.25)
        yield process, url
    finally:
        if session_processes(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def tf_serving_body(image: Path) -> dict[str, Any]:
    return {"instances": [{"image_bytes": {"b64": b64(image)}, "key": "1"}]}
