"""The inference worker's side of a model server: LitServe's ``LitAPI`` over a serving package.

LitServe batches the images that arrive within ``batch_timeout`` (up to ``max_batch_size``) and
calls ``decode_request`` for each, then ``predict`` once. Its batched loop fails every request of
a batch when any call raises, so a bad image is not raised: it becomes a ``Failed`` that rides
through the batch and is answered alone (400), while the rest run through the network as one.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import litserve as ls

from trainer.errors import UserError


@dataclass
class Ready:
    pixels: Any  # the network's input for one image
    params: dict[str, float]


@dataclass
class Failed:
    message: str


class DeployedModel(ls.LitAPI):
    def __init__(
        self, package: Path, workers: int, max_batch_size: int, batch_timeout: float, spec: Any
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec)
        self.package, self.workers = str(package), workers

    def setup(self, device: str) -> None:
        import torch

        from trainer.serving.package import read_package
        from trainer.stored_model import load_network
        from trainer.tasks import task_of

        self.device = torch.device(device)
        if self.device.type == "cpu":  # the workers share the cores: no more threads than cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.workers))
        trained = read_package(Path(self.package))
        network = load_network(trained).to(self.device)
        self.model = task_of(trained.settings).online(network, trained.settings, trained.labels)

    def decode_request(self, request: dict[str, Any]) -> Ready | Failed:
        """One image (trainer/serving/requests.py's item); LitServe names the argument."""
        from PIL import UnidentifiedImageError

        from trainer.data.prediction import rgb_image
        from trainer.data.prediction_inputs import Refused

        try:
            params = read_params(request.get("params") or {}, self.model.params)
            with io.BytesIO(request["image"]) as handle:
                return Ready(self.model.transform(rgb_image(handle, "the image")), params)
        except (UserError, Refused) as error:
            return Failed(str(error))
        except UnidentifiedImageError:
            return Failed("the bytes are no image (JPEG, PNG, GIF, BMP, WebP or TIFF)")
        except Exception as error:  # Pillow raises many types for broken or truncated images
            return Failed(f"the image cannot be decoded ({type(error).__name__}: {error})")

    def batch(self, inputs: list[Ready | Failed]) -> list[Ready | Failed]:
        return inputs  # predict stacks the ones that decoded

    def predict(self, inputs: Any) -> Any:
        import torch

        items = inputs if isinstance(inputs, list) else [inputs]  # max_batch_size 1: one item
        ready = [item for item in items if isinstance(item, Ready)]
        outputs: list[Any] = []
        if ready:
            with torch.inference_mode():
                pixels = torch.stack([item.pixels for item in ready]).to(self.device)
                outputs = self.model.outputs(pixels)
        found = iter(outputs)
        answers = [self._answer(item, found, len(items)) for item in items]
        return answers if isinstance(inputs, list) else answers[0]

    def _answer(self, item: Ready | Failed, outputs: Any, batch: int) -> dict[str, Any]:
        if isinstance(item, Failed):
            return {"error": item.message, "batch": batch}
        output = next(outputs)
        return {
            "annotations": self.model.annotations(output, item.params),
            "tfServing": self.model.tf_serving(output),
            "batch": batch,
        }

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def read_params(given: dict[str, str], defaults: dict[str, float]) -> dict[str, float]:
    """AutoML's params (strings) as numbers, each checked; the model's defaults for the rest."""
    params = dict(defaults)
    for key, text in given.items():
        if key not in defaults:
            raise UserError(f"params {key!r} is not taken; give {', '.join(sorted(defaults))}")
        try:
            value = float(text)
        except ValueError:
            raise UserError(f"params {key}={text!r} is not a number") from None
        if key == "score_threshold" and not 0.0 <= value <= 1.0:
            raise UserError(f"params score_threshold={text} must be within [0, 1]")
        if key != "score_threshold" and (value < 1 or value != int(value)):
            raise UserError(f"params {key}={text} must be a whole number, at least 1")
        params[key] = value
    return params
