"""The MLflow model of a TorchScript network (a detector's, or ``mlflow.model_format=torchscript``):
a pyfunc logged as code (``Store.log_code_model``), with the scripted network as its artifact.

MLflow's pytorch flavour saves a scripted module under its pickle label, and then refuses to load
it with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. Logged this way, loading it runs this file
and ``torch.jit.load``: nothing is unpickled. MLflow copies this file into the logged model and
runs it there, so it imports only MLflow, NumPy, torch and torchvision, nothing of this project.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
import torchvision  # noqa: F401 - registers the ops a scripted detector calls (nms, box_iou_rotated)
from mlflow.pyfunc import PythonModel

ARTIFACT = "torchscript"  # the scripted network's key among the logged model's artifacts


class TorchScriptModel(PythonModel):
    """One float32 batch in, the network's one tensor out (``mlflow models serve`` serves it)."""

    def load_context(self, context: Any) -> None:
        self.network = torch.jit.load(context.artifacts[ARTIFACT], map_location="cpu").eval()

    # No type hint on model_input: MLflow would take one for the input's schema, which the
    # input example gives (a batch of images).
    def predict(self, context, model_input, params=None):
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.network(batch).numpy()


mlflow.models.set_model(TorchScriptModel())
