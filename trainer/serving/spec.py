"""The HTTP side of a model server: a LitServe spec with AutoML's and TF Serving's routes.

A LitSpec owns its routes and puts requests on LitServe's queue itself. That is what lets one
request be several images (TF Serving's instances, each batched on its own), an image that
failed be answered 400 while the others of its batch are answered 200, and every request have
a deadline (LitServe's own handler waits as long as the worker takes).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem

from trainer.errors import UserError
from trainer.server.errors import ApiError, error_body
from trainer.serving.requests import (
    automl_item,
    predict_response,
    tf_serving_items,
    tf_serving_response,
)

TF_SERVING_PATH = "/v1/models/default:predict"
AUTOML_PATH = "/{api}/projects/{project}/locations/{location}/models/{model_id}:predict"
BATCH_HEADER = "x-batch-size"  # how many images ran through the network together with this one


class OnlineSpec(LitSpec):
    def __init__(self, model_id: str, timeout: float) -> None:
        super().__init__()
        self.model_id, self.timeout = model_id, timeout
        self.api_path = TF_SERVING_PATH  # the name of LitServe's request queue
        self.add_endpoint(TF_SERVING_PATH, self.tf_serving, ["POST"])
        self.add_endpoint(AUTOML_PATH, self.automl, ["POST"])

    def decode_request(self, request: Any, context_kwargs: Any = None) -> Any:
        return request  # DeployedModel decodes

    def encode_response(self, output: Any, context_kwargs: Any = None) -> Any:
        return output

    async def automl(
        self, request: Request, api: str, project: str, location: str, model_id: str
    ) -> JSONResponse:
        try:
            if api not in ("v1", "v1beta1"):
                raise ApiError("NOT_FOUND", f"no method at {request.url.path}")
            if model_id != self.model_id:
                raise ApiError("NOT_FOUND", f"model {model_id!r} is not deployed here "
                              f"(this server serves {self.model_id})")  # fmt: skip
            item = automl_item(await request.body(), api)
            (answer,) = await asyncio.gather(self._answer(item))
        except UserError as error:
            return _google_error("INVALID_ARGUMENT", str(error))
        except ApiError as refused:
            return _google_error(refused.status, refused.message, refused.http_status)
        if "error" in answer:  # the image failed, alone
            return _google_error("INVALID_ARGUMENT", answer["error"], headers=_batch(answer))
        return JSONResponse(predict_response(answer), headers=_batch(answer))

    async def tf_serving(self, request: Request) -> JSONResponse:
        try:
            items = tf_serving_items(await request.body())
            answers = await asyncio.gather(*(self._answer(item) for item in items))
        except (UserError, ApiError) as error:
            status = 400 if isinstance(error, UserError) else error.http_status
            return JSONResponse({"error": str(error)}, status_code=status)
        for number, answer in enumerate(answers):
            if "error" in answer:  # as TF Serving, one bad instance fails its request
                text = f"instances[{number}]: {answer['error']}"
                return JSONResponse({"error": text}, status_code=400, headers=_batch(answer))
        return JSONResponse(tf_serving_response(items, answers), headers=_batch(answers[0]))

    async def _answer(self, item: dict[str, Any]) -> dict[str, Any]:
        uid = uuid.uuid4()
        event = asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), item))
        try:
            await asyncio.wait_for(event.wait(), self.timeout)
        except asyncio.TimeoutError:
            raise ApiError("DEADLINE_EXCEEDED", f"no answer within {self.timeout:g} s") from None
        finally:
            found = self.response_buffer.pop(uid, None)
        assert found is not None
        response, status = found.response
        if isinstance(response, HTTPException) and response.status_code == 504:
            # LitServe's own deadline: the image waited in its queue too long.
            raise ApiError("DEADLINE_EXCEEDED", f"no answer within {self.timeout:g} s")
        if status != LitAPIStatus.OK or not isinstance(response, dict):
            raise ApiError("INTERNAL", "the model failed on this request's batch; see the log")
        return response


def _google_error(
    status: str, message: str, http_status: int | None = None, headers: dict | None = None
) -> JSONResponse:
    code, body = error_body(status, message, http_status)
    return JSONResponse(body, status_code=code, headers=headers)


def _batch(answer: dict[str, Any]) -> dict[str, str]:
    return {BATCH_HEADER: str(answer.get("batch", 1))}
