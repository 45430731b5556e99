"""The quickstart notebook runs top to bottom: it trains a model, shows it and plots it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"

pytestmark = pytest.mark.slow


def _kernel_manager_class():
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonKernelManager(AsyncKernelManager):
        """The `python3` kernel as ipykernel defines it for this interpreter (the venv's python).

        Installed kernelspecs are ignored: a user-level `python3` spec could point elsewhere,
        and a fresh venv may have none.
        """

        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=[])

    return ThisPythonKernelManager


def test_quickstart_notebook_runs(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    manager_class = _kernel_manager_class()
    assert manager_class(kernel_name="python3").kernel_spec.argv[0] == sys.executable

    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "HYDRA_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["QUICKSTART_WORKDIR"] = str(tmp_path)

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells), "store it without outputs"
    client = nbclient.NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        kernel_manager_class=manager_class,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output["output_type"] == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no figure shown"

    (model_json,) = tmp_path.glob("runs/**/model.json")
    model = json.loads(model_json.read_text())
    metadata = model["imageClassificationModelMetadata"]
    assert metadata["stopReason"] in ("MODEL_CONVERGED", "BUDGET_REACHED")
    assert model["displayName"] == "quickstart"
    assert (tmp_path / "mlflow.db").is_file()
