"""The lists of models and operations as AutoML's List methods have them: a ``filter`` in
AutoML's syntax, ``pageSize`` and ``pageToken`` in, one page and ``nextPageToken`` out, newest
first. Used by catalog.py for the CLI's lists and the API server's alike.

A page reads only its own records: the order comes from each entry's createTime alone
(reader.Listing), and whole records are read for as many entries as the page needs (more when
the filter passes entries by). A page token is the position after the last entry given (its
time and key), so a model registered meanwhile neither shifts a page nor repeats an entry.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

from trainer.errors import UserError
from trainer.store.automl import bare_id, field_name
from trainer.store.reader import Listing, Record
from trainer.store.resources import parse_time

# AutoML's ListModels and ListOperations leave the default page size to the server: the CLI's
# table and the API's page are this long unless asked otherwise; no page is longer than the most.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# An entry's place in a list: (1, microseconds since the epoch, key) for a readable createTime,
# (0, 0, key) for one that is not (listed last: a list is where such an entry is found and
# deleted); newest first is this key descending, the key settling equal times.
SortKey = tuple[int, int, str]
Result = TypeVar("Result")


class ListRequestError(UserError):
    """A bad filter, page size or page token. ``argument`` names which as the API spells it
    (``filter``, ``pageSize``, ``pageToken``); the CLI says its own flag instead."""

    def __init__(self, argument: str, problem: str) -> None:
        super().__init__(f"{argument} {problem}")
        self.argument, self.problem = argument, problem


# -- page size and tokens -------------------------------------------------------------------


def page_limit(page_size: int | None) -> int | None:
    """How many entries a page holds: ``page_size``, the default for 0, every one for None."""
    if page_size is None:
        return None
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise ListRequestError(
            "pageSize", f"{page_size} is out of range: use 1 to {MAX_PAGE_SIZE}, "
            f"or 0 for the default ({DEFAULT_PAGE_SIZE})",
        )  # fmt: skip
    return page_size or DEFAULT_PAGE_SIZE


def sort_key(created: Any, key: str) -> SortKey:
    try:
        moment = parse_time(created) if isinstance(created, str) else None
    except UserError:
        moment = None
    if moment is None:
        return (0, 0, key)
    return (1, (moment - EPOCH) // timedelta(microseconds=1), key)


def _canonical(filter_text: str) -> str:
    return " ".join(filter_text.split())


def encode_token(kind: str, filter_text: str, after: SortKey, parent: str = "") -> str:
    """An opaque token for the page after ``after``: URL-safe base64 of a JSON cursor that
    also names the list, its parent and the filter it continues."""
    cursor = {"list": kind, "parent": parent, "filter": _canonical(filter_text),
              "after": list(after)}  # fmt: skip
    encoded = base64.urlsafe_b64encode(json.dumps(cursor, separators=(",", ":")).encode())
    return encoded.decode().rstrip("=")


def decode_token(token: str, kind: str, filter_text: str, parent: str = "") -> SortKey | None:
    """Where the page of ``token`` starts (None: at the newest entry, for no token)."""
    if not token:
        return None
    cursor = _cursor(token)
    if cursor is None or cursor.get("list") != kind or cursor.get("parent") != parent:
        raise ListRequestError(
            "pageToken", f"{token[:40]!r} is not a page token of the {kind} list; "
            "start again without one",
        )  # fmt: skip
    if cursor.get("filter") != _canonical(filter_text):
        raise ListRequestError(
            "pageToken", f"was given with another filter ({cursor.get('filter')!r}); "
            "give that filter again, or start again without a page token",
        )  # fmt: skip
    return tuple(cursor["after"])


def _cursor(token: str) -> dict[str, Any] | None:
    """The cursor in a token; None for anything that is not one this module made."""
    try:
        cursor = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    after = cursor.get("after") if isinstance(cursor, dict) else None
    shape = [int, int, str]
    if not isinstance(after, list) or [type(value) for value in after] != shape:
        return None
    return cursor


# -- filters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    key: str
    operator: str  # "=", "!=" or ":"
    value: str
    text: str  # as written, for messages


TERM = re.compile(
    r"""\s*(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<operator>!=|=|:)\s*"""
    r"""(?P<value>"[^"]*"|'[^']*'|[^\s"']+)\s*"""
)
AND = re.compile(r"AND\s+", re.IGNORECASE)


def parse_terms(text: str) -> list[Term]:
    """AutoML's filter syntax as far as these lists need it: ``key op value`` terms (``=``,
    ``!=`` or ``:``, spaces around the operator allowed, values optionally quoted), joined by
    AND or by spaces alone. Every term must hold."""
    terms: list[Term] = []
    position, end = 0, len(text.rstrip())
    while position < end:
        found = TERM.match(text, position)
        if found is None:
            raise ListRequestError("filter", f"{text[position:].strip()[:60]!r} is not a term "
                                   "such as key=value")  # fmt: skip
        value = found["value"]
        if value[0] in "\"'":
            value = value[1:-1]
        terms.append(Term(found["key"], found["operator"], value, found.group().strip()))
        position = found.end()
        conjunction = AND.match(text, position) if terms else None
        position = conjunction.end() if conjunction else position
    return terms


def _unknown(term: Term, allowed: list[str]) -> ListRequestError:
    return ListRequestError(
        "filter", f"term {term.text!r} is not understood; use {', '.join(allowed)}"
    )


def _metadata_key(key: str) -> str | None:
    """A Model metadata field's JSON name from either spelling (``..._model_metadata``,
    ``...ModelMetadata``); None for a key that names no metadata field."""
    if key.endswith("_model_metadata"):
        first, *rest = key.split("_")
        return first + "".join(part.capitalize() for part in rest)
    return key if key.endswith("ModelMetadata") else None


ModelTest = Callable[[dict[str, Any], dict[str, Any]], bool]


def model_filter(text: str, task_keys: Mapping[str, str] | None = None) -> ModelTest:
    """Whether a Model (with its details, catalog.models' pairs) passes ``text``: AutoML's
    ListModels terms (``<metadata>:*`` in snake or camel case, ``dataset_id=ID``,
    ``dataset_id!=ID``) and the CLI's (``model_type=``, ``display_name=``, and ``task=`` where
    ``task_keys`` maps task names to their metadata keys, which also limits ``<metadata>:*``
    to those keys)."""
    tests = [_model_term(term, task_keys) for term in parse_terms(text)]
    return lambda model, details: all(test(model, details) for test in tests)


def _model_terms_allowed(task_keys: Mapping[str, str] | None) -> list[str]:
    metadata = sorted(f"{field_name(key)}:*" for key in (task_keys or {}).values())
    return [
        *(["task=TASK"] if task_keys else []),
        "model_type=TYPE",
        "display_name=NAME",
        "dataset_id=ID",
        "dataset_id!=ID",
        *(metadata or ["<task>_model_metadata:*"]),
    ]


def _model_term(term: Term, task_keys: Mapping[str, str] | None) -> ModelTest:
    key, operator, value = term.key, term.operator, term.value
    if key == "task" and operator == "=" and task_keys is not None:
        if value not in task_keys:
            raise ListRequestError("filter", f"task={value!r} is not a task; use "
                                   f"{', '.join(sorted(task_keys))}")  # fmt: skip
        task_key = task_keys[value]
        return lambda model, details: task_key in model
    if key == "model_type" and operator == "=":
        return lambda model, details: details.get("modelType") == value
    if key == "display_name" and operator == "=":
        return lambda model, details: model.get("displayName") == value
    if key == "dataset_id" and operator in ("=", "!="):
        wanted, equal = bare_id(value, "datasets"), operator == "="
        return lambda model, details: (model.get("datasetId") == wanted) == equal
    metadata = _metadata_key(key)
    known = task_keys is None or metadata in task_keys.values()
    if metadata is not None and known and operator == ":" and value == "*":
        return lambda model, details: metadata in model
    raise _unknown(term, _model_terms_allowed(task_keys))


OperationTest = Callable[[dict[str, Any], dict[str, str]], bool]
OPERATION_TERMS = ["done=true", "done=false", "worksOn=models/ID"]


def operation_filter(text: str) -> OperationTest:
    """Whether an Operation (with its run's tags) passes ``text``: AutoML's ListOperations
    terms, ``done=true|false`` and ``worksOn=`` a model's name (full, ``models/ID`` or the
    ID), which every operation on that model's run tags name (training, evaluation, ...)."""
    tests = [_operation_term(term) for term in parse_terms(text)]
    return lambda operation, tags: all(test(operation, tags) for test in tests)


def _operation_term(term: Term) -> OperationTest:
    if term.key == "done" and term.operator == "=":
        if term.value not in ("true", "false"):
            raise ListRequestError("filter", f"done={term.value!r} is not understood: use "
                                   "done=true or done=false")  # fmt: skip
        done = term.value == "true"
        return lambda operation, tags: bool(operation.get("done")) == done
    if term.key == "worksOn" and term.operator == "=":
        model_id = bare_id(term.value, "models")
        return lambda operation, tags: tags.get("model_id") == model_id
    raise _unknown(term, OPERATION_TERMS)


# -- pages ----------------------------------------------------------------------------------


def page(
    listing: Listing[Record],
    accept: Callable[[Record], Result | None],
    limit: int | None,
    after: SortKey | None,
) -> tuple[list[Result], SortKey | None]:
    """Up to ``limit`` results (every one for None) of the entries after ``after``, newest
    first: ``accept`` turns a whole record into a result, or None to pass it by (another
    project's, or one the filter keeps out). Also the position of the last result where more
    follow (one more is looked for, so that the last page has no token), else None."""
    keys = sorted((sort_key(created, key) for key, created in listing.created), reverse=True)
    if after is not None:
        keys = [key for key in keys if key < after]
    found: list[tuple[SortKey, Result]] = []
    start, chunk = 0, len(keys) if limit is None else limit + 1
    while start < len(keys) and (limit is None or len(found) <= limit):
        batch = keys[start : start + chunk]
        records = listing.load([key[2] for key in batch])
        for key in batch:
            result = accept(records[key[2]]) if key[2] in records else None
            if result is not None:
                found.append((key, result))
        start, chunk = start + chunk, chunk * 2  # a filter passing many by: read more at once
    if limit is not None and len(found) > limit:
        return [result for _, result in found[:limit]], found[limit - 1][0]
    return [result for _, result in found], None
