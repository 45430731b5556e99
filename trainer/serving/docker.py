"""`models export --format docker`: a folder that builds an image serving one model online.

The folder holds the serving package (``model/``, package.py), the project's source (``app/``),
a ``Dockerfile`` and ``entrypoint.sh``, which execs the model server (main.py) so that the
server is the container's first process and gets ``docker stop``'s SIGTERM itself (it drains).

The project is not on PyPI, so its source goes along, and the image installs it as the Makefile
does: every dependency from requirements.lock, each file hash-checked, then the project itself
editable, without dependencies or a build environment (the lock pins setuptools). Editable and
not a wheel: conf/ is found beside the packages (``trainer.CONF_DIR``), and a wheel has no conf/.

Nothing here imports torch: the CLI and the API server refuse a batch-only model before it loads.
"""

from __future__ import annotations

import fnmatch
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer import CONF_DIR
from trainer.errors import UserError
from trainer.serving.deployments import check_online

if TYPE_CHECKING:
    from trainer.stored_model import TrainedModel

PROJECT_ROOT = CONF_DIR.parent  # where pyproject.toml is, in a checkout of the project
PACKAGE_FOLDER = "model"
APP_FOLDER = "app"
ENTRYPOINT = "entrypoint.sh"
PORT = 8080
# requirements.lock is resolved for CPython 3.11 on Linux x86_64: the image's Python and platform.
BASE_IMAGE = "python:3.11-slim"
LOCK_FILE = "requirements.lock"
# The image's folder: the entrypoint finds model/ beside itself.
IMAGE_ROOT = "/srv"

DOCKERFILE = f"""\
# Written by `python -m trainer models export --format docker`. Build in this folder:
#   docker build -t NAME .
# Run (a key is required: the server listens on every interface of the container):
#   docker run -p {PORT}:{PORT} -v /path/to/key:/run/secrets/api-key:ro \\
#     -e API_KEY_FILE=/run/secrets/api-key NAME
FROM {BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR {IMAGE_ROOT}
# The dependencies first, in a layer of their own: an export of another model reuses it.
COPY {APP_FOLDER}/{LOCK_FILE} {APP_FOLDER}/{LOCK_FILE}
RUN pip install --require-hashes -r {APP_FOLDER}/{LOCK_FILE}
COPY {APP_FOLDER}/ {APP_FOLDER}/
RUN pip install --no-deps --no-build-isolation -e {APP_FOLDER}
COPY {PACKAGE_FOLDER}/ {PACKAGE_FOLDER}/
COPY {ENTRYPOINT} {ENTRYPOINT}
RUN useradd --create-home --uid 10001 serving
USER serving
EXPOSE {PORT}
ENTRYPOINT ["{IMAGE_ROOT}/{ENTRYPOINT}"]
"""

ENTRYPOINT_SCRIPT = """\
#!/bin/sh
# The model server of the package beside this script (python -m trainer.serving), exec'd: its
# process is this one, so SIGTERM (docker stop) reaches the server, which drains and exits 0.
# Each variable has the image's value by default; set them to run this outside the image.
#   PORT          the port to listen on (8080)
#   HOST          0.0.0.0 in a container; 127.0.0.1 or :: are the others
#   API_KEY_FILE  a file whose first line is the key every request but /health must carry
#                 (x-goog-api-key or Authorization: Bearer); required unless HOST is 127.0.0.1
#   NODE_COUNT    inference workers on a CPU; a GPU machine has one per device
#                 (app/conf/serve.yaml's online.node_count)
#   MODEL_DIR     the serving package (model/ beside this script)
#   PYTHON        the interpreter that has the project installed (python)
# Arguments are the server's flags, after these (the later wins): e.g. --max-batch-size 16.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
if [ -n "${NODE_COUNT:-}" ]; then
    set -- --workers "$NODE_COUNT" "$@"
fi
if [ -n "${API_KEY_FILE:-}" ]; then
    set -- --api-key-file "$API_KEY_FILE" "$@"
fi
exec "${PYTHON:-python}" -m trainer.serving "${MODEL_DIR:-$here/model}" \\
    --host "${HOST:-0.0.0.0}" --port "${PORT:-8080}" "$@"
"""


def check_servable(model: dict[str, Any]) -> None:
    """An image serves online prediction: a model of a batch-only task is refused in one line."""
    try:
        check_online(model)
    except UserError as error:
        raise UserError(f"{error}; or export it as onnx or torchscript") from None


def write_docker_export(trained: TrainedModel, folder: Path) -> dict[str, Any]:
    """Write the image's files into ``folder``; the metadata of the export, once the package
    written there has loaded back as the model server loads it."""
    check_servable(trained.model)
    package = folder / PACKAGE_FOLDER
    from trainer.serving.package import write_package

    write_package(trained, package)
    copy_project(folder / APP_FOLDER)
    (folder / "Dockerfile").write_text(DOCKERFILE)
    entrypoint = folder / ENTRYPOINT
    entrypoint.write_text(ENTRYPOINT_SCRIPT)
    # Executable by whoever may read it (the umask decided who that is).
    readable = entrypoint.stat().st_mode & 0o444
    entrypoint.chmod(entrypoint.stat().st_mode | readable >> 2)
    return {
        "package": PACKAGE_FOLDER,
        "entrypoint": ENTRYPOINT,
        "baseImage": BASE_IMAGE,
        "port": PORT,
        "build": f"docker build -t {image_tag(trained.model_id)} .",
        "verification": loaded_package(package),
    }


def loaded_package(package: Path) -> dict[str, Any]:
    """The package read back and its network loaded, as each inference worker does."""
    from trainer.serving.package import CHECKPOINT_FILE, read_package
    from trainer.store.resources import file_sha256
    from trainer.stored_model import load_network

    network = load_network(read_package(package))
    return {
        "parameters": sum(parameter.numel() for parameter in network.parameters()),
        "checkpointSha256": file_sha256(package / CHECKPOINT_FILE),
    }


def image_tag(model_id: str) -> str:
    return f"vision-trainer-{model_id.lower()}"  # Docker's names are lower case


def copy_project(app: Path) -> None:
    """What ``pip install`` of the project needs: pyproject.toml, its readme, the lock, the
    packages pyproject.toml includes, and conf/."""
    project = read_pyproject()
    setuptools = project.get("tool", {}).get("setuptools", {})
    patterns = setuptools.get("packages", {}).get("find", {}).get("include", [])
    packages = [
        path
        for path in sorted(PROJECT_ROOT.iterdir())
        if path.is_dir() and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns)
    ]
    app.mkdir(parents=True)
    readme = str(project.get("project", {}).get("readme", "README.md"))
    for name in ("pyproject.toml", LOCK_FILE, readme):
        shutil.copyfile(PROJECT_ROOT / name, app / name)
    leftovers = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for source in [*packages, CONF_DIR]:
        shutil.copytree(source, app / source.name, ignore=leftovers)


def read_pyproject() -> dict[str, Any]:
    path = PROJECT_ROOT / "pyproject.toml"
    if not path.is_file() or not (PROJECT_ROOT / LOCK_FILE).is_file():
        raise UserError(f"--format docker ships the project's source: {path} and {LOCK_FILE} "
                        "are not there (run it from a checkout of the project)")  # fmt: skip
    if sys.version_info < (3, 11):
        raise UserError("--format docker needs Python 3.11, the image's (tomllib)")
    import tomllib

    return tomllib.loads(path.read_text())
