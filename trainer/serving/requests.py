"""The two request shapes a model server answers, read into one item per image, and the
answers put back together. No torch: this runs in the HTTP processes.

- AutoML's ``PredictRequest`` (``POST .../models/ID:predict``): one image,
  ``{"payload": {"image": {"imageBytes": "<base64>"}}, "params": {"score_threshold": "0.5"}}``,
  parsed strictly by Google's own message type; the answer is a ``PredictResponse``.
- TensorFlow Serving's predict (``POST /v1/models/default:predict``), as AutoML Edge's container
  took it: ``{"instances": [{"image_bytes": {"b64": "<base64>"}, "key": "1"}, ...]}``; the answer
  is ``{"predictions": [{..., "key": "1"}, ...]}``.

Each image goes to the inference workers on its own, so that dynamic batching mixes the images
of every request, and an image that fails fails alone.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from trainer.errors import UserError, first_line

AUTOML = "automl"
TF_SERVING = "tf_serving"
MAX_INSTANCES = 64  # images in one TF Serving request


def automl_item(body: bytes, api: str) -> dict[str, Any]:
    """The image and params of an AutoML PredictRequest body (v1 or v1beta1's message)."""
    from google.cloud import automl_v1, automl_v1beta1

    message = (automl_v1beta1 if api == "v1beta1" else automl_v1).PredictRequest
    try:
        request = message.from_json(body.decode("utf-8") or "{}", ignore_unknown_fields=False)
    except Exception as error:  # protobuf's ParseError, a UnicodeDecodeError, ...
        raise UserError(f"the body is not a PredictRequest: {first_line(error)}") from None
    image = request.payload.image.image_bytes
    if not image:
        raise UserError("payload.image.imageBytes is empty: send the image's bytes in base64")
    return {"image": bytes(image), "params": dict(request.params), "form": AUTOML}


def tf_serving_items(body: bytes) -> list[dict[str, Any]]:
    """The images (and keys) of a TF Serving predict body."""
    try:
        found = json.loads(body or b"{}")
    except ValueError as error:
        raise UserError(f"the body is not JSON: {error}") from None
    instances = found.get("instances") if isinstance(found, dict) else None
    if not isinstance(instances, list) or not instances:
        raise UserError('give {"instances": [{"image_bytes": {"b64": "..."}, "key": "..."}]}')
    if len(instances) > MAX_INSTANCES:
        raise UserError(f"{len(instances)} instances: send at most {MAX_INSTANCES} a request")
    return [_instance(instance, number) for number, instance in enumerate(instances)]


def _instance(instance: Any, number: int) -> dict[str, Any]:
    encoded = instance.get("image_bytes") if isinstance(instance, dict) else None
    text = encoded.get("b64") if isinstance(encoded, dict) else None
    if not isinstance(text, str):
        raise UserError(f'instances[{number}]: give "image_bytes": {{"b64": "<base64>"}}')
    try:
        image = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UserError(f"instances[{number}].image_bytes.b64 is not base64") from None
    key = instance.get("key", str(number))
    return {"image": image, "params": {}, "form": TF_SERVING, "key": str(key)}


def predict_response(answer: dict[str, Any]) -> dict[str, Any]:
    """AutoML's PredictResponse of one image's answer."""
    return {"payload": answer["annotations"], "metadata": {}}


def tf_serving_response(items: list[dict[str, Any]], answers: list[dict[str, Any]]) -> dict:
    return {
        "predictions": [
            {**answer["tfServing"], "key": item["key"]}
            for item, answer in zip(items, answers, strict=True)
        ]
    }
