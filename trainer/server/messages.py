"""What every route reads from a request: the parent in its path, its body as one of Google's
message types (strictly: an unknown field is refused), its paging; and a List response."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from trainer.server.errors import ApiError
from trainer.store.automl import Parent


def parent_name(parent: Parent) -> str:
    return f"projects/{parent.project}/locations/{parent.location}"


def parent_of(project: str, location: str) -> Parent:
    return Parent(project, location)  # refuses a malformed project or location


async def parsed_body(request: Request, message: Any) -> Any:
    """The request's JSON as Google's ``message``, strictly: an unknown field is refused."""
    from google.protobuf.json_format import ParseError

    raw = await request.body()
    try:
        return message.from_json(raw.decode("utf-8") or "{}", ignore_unknown_fields=False)
    except (ParseError, UnicodeDecodeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "not JSON"
        raise ApiError("INVALID_ARGUMENT", f"the request body: {first}") from None


def message_types(request: Request) -> Any:
    """Google's message types of the request's API version."""
    if request.url.path.startswith("/v1beta1/"):
        from google.cloud import automl_v1beta1

        return automl_v1beta1
    from google.cloud import automl_v1

    return automl_v1


def page_arguments(request: Request) -> tuple[str, int, str]:
    query = request.query_params
    try:
        page_size = int(query.get("pageSize", query.get("page_size", "0")) or 0)
    except ValueError:
        raise ApiError("INVALID_ARGUMENT", "pageSize must be a whole number") from None
    token = query.get("pageToken", query.get("page_token", ""))
    return query.get("filter", ""), page_size, token


def listed(key: str, items: list[Any], token: str) -> dict[str, Any]:
    """A List response as proto3's JSON writes it: an empty list or token is left out."""
    found: dict[str, Any] = {key: items} if items else {}
    return {**found, "nextPageToken": token} if token else found
