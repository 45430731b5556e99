"""The lists page as AutoML's List methods do (issue 30): newest first, every entry once across
pages, an empty token after the last page, AutoML's filter syntax beside the CLI's terms, one-line
errors for a bad filter, page size or token; `--all`, and nextPageToken in the JSON. The store is
registry entries and runs made with MLflow's own client, no training."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LOCAL, cli_in_process
from tests.test_registry_records import FIGURES_OF_NEW
from trainer.errors import UserError
from trainer.store.catalog import Catalog
from trainer.store.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, page_limit
from trainer.store.reader import MODEL_TAG, SqliteReader, _in_memory_models, _in_memory_operations
from trainer.tasks import task_configs, task_metadata_keys

MODELS = 26
START = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)
BAD_TIME = 3  # this model's createTime is no time: listed last
TIED = (5, 6)  # these two were created in the same microsecond: the greater ID first
TYPES = ["mobile-low-latency-1", "mobile-versatile-1"]
DATASETS = ["a" * 16, "b" * 16]
TASKS = sorted(task_metadata_keys())


@dataclass
class Entry:
    model: dict[str, Any]
    operation: dict[str, Any]
    task: str
    model_type: str


def model_id(index: int) -> str:
    return f"ICN{7000000000000000000 + index}"


def created(index: int) -> str:
    if index == BAD_TIME:
        return "not a time"
    hours = TIED[0] if index in TIED else index
    return (START + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry(index: int) -> Entry:
    task, model_type = TASKS[index % len(TASKS)], TYPES[index % 2]
    model = {
        "name": f"{LOCAL}/models/{model_id(index)}",
        "displayName": f"model_{index}",
        "datasetId": DATASETS[index % 2],
        "createTime": created(index),
        "updateTime": created(index),
        "deploymentState": "UNDEPLOYED",
        task_metadata_keys()[task]: {**FIGURES_OF_NEW, "modelType": model_type},
    }
    moment = START + timedelta(hours=index, minutes=1)  # operations: every time readable
    operation = {
        "name": f"{LOCAL}/operations/ICN{6000000000000000000 + index}",
        "metadata": {"createTime": moment.isoformat().replace("+00:00", "Z")},
        "done": index % 3 != 0,
    }
    return Entry(model, operation, task, model_type)


ENTRIES = [entry(index) for index in range(MODELS)]


def newest_first(entries: list[Entry], key: str) -> list[Entry]:
    """The expected order: by time (a bad one last), then by name, both descending."""

    def order(e: Entry) -> tuple[bool, str, str]:
        resource = e.model if key == "model" else e.operation
        when = resource.get("createTime") or resource["metadata"]["createTime"]
        return (when != "not a time", when, resource["name"])

    return sorted(entries, key=order, reverse=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every entry registered and its operation's run created, with another project's entries
    and runs beside them; the folder that holds the store."""
    from trainer.store.store import Store, metadata_tags

    cwd = tmp_path_factory.mktemp("listing")
    store = Store(f"sqlite:///{cwd / 'mlflow.db'}", "vision-trainer")
    for item in ENTRIES:
        details = {"expireTime": "2099-01-01T00:00:00.000000Z", **FIGURES_OF_NEW}
        tags = metadata_tags(item.model, {**details, "modelType": item.model_type})
        tags.update({MODEL_TAG: json.dumps(item.model), "task": item.task})
        store.client.create_registered_model(tags["model_id"], tags=tags, description="ours")
        run_tags = {"model_id": tags["model_id"], "operation_json": json.dumps(item.operation)}
        store.client.create_run(store.experiment_id, tags=run_tags)
    newest = {"name": "shaped", "displayName": "x", "createTime": "2099-01-01T00:00:00Z"}
    store.client.create_registered_model("churn", description="another team's")
    store.client.create_registered_model("shaped", description=json.dumps(newest))
    store.client.create_run(store.experiment_id, tags={"operation_json": "{not json"})
    store.client.create_run(store.experiment_id, tags={"note": "a run of no operation"})
    return cwd


@pytest.fixture
def catalog(store: Path) -> Catalog:
    return Catalog(f"sqlite:///{store / 'mlflow.db'}", "vision-trainer")


def every_page(read: Any, size: int, **filtering: str) -> tuple[list[list], list[str]]:
    """Every page of a list, following its tokens: the pages and the tokens each gave."""
    pages, tokens, token = [], [], ""
    while True:
        found, token = read(page_size=size, page_token=token, **filtering)
        pages.append(found)
        tokens.append(token)
        if not token:
            return pages, tokens


def names(models: list[tuple[dict, dict]]) -> list[str]:
    return [model["name"] for model, _ in models]


# -- paging ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, MODELS - 1, MODELS, MAX_PAGE_SIZE])
def test_model_pages_give_every_model_once_newest_first(catalog: Catalog, size: int) -> None:
    pages, tokens = every_page(catalog.models_page, size)
    assert all(len(found) == size for found in pages[:-1]) and 0 < len(pages[-1]) <= size
    listed = [name for found in pages for name in names(found)]
    assert listed == [e.model["name"] for e in newest_first(ENTRIES, "model")]
    assert listed[-1].endswith(model_id(BAD_TIME))
    assert listed.index(ENTRIES[TIED[1]].model["name"]) + 1 == listed.index(
        ENTRIES[TIED[0]].model["name"]
    )
    assert tokens[-1] == "" and all(tokens[:-1]) and len(set(tokens)) == len(tokens)
    assert names(catalog.models()) == listed  # the whole list, as other code reads it


def test_operation_pages_give_every_operation_once_newest_first(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    pages, tokens = every_page(catalog.operations_page, 4)
    listed = [operation["name"] for found in pages for operation in found]
    assert listed == [e.operation["name"] for e in newest_first(ENTRIES, "operation")]
    assert tokens[-1] == "" and all(tokens[:-1])
    assert [op["name"] for op in catalog.operations()] == listed
    # The run whose operation_json is no Operation is passed by and reported, not a traceback.
    assert any("is not an Operation" in record.getMessage() for record in caplog.records)


def test_the_default_page_and_its_bounds() -> None:
    assert page_limit(0) == DEFAULT_PAGE_SIZE == 50 and page_limit(None) is None
    assert page_limit(MAX_PAGE_SIZE) == MAX_PAGE_SIZE == 1000


def test_the_sql_order_is_the_order_of_the_records_themselves(store: Path) -> None:
    """The reader orders by createTime read with SQLite's JSON functions; a tracking server's
    whole records give the same times in Python, foreign entries and broken JSON included."""
    reader = SqliteReader(store / "mlflow.db", "vision-trainer")
    assert sorted(reader.model_listing().created) == sorted(
        _in_memory_models(reader.registered_models()).created
    )
    assert sorted(reader.operation_listing().created, key=str) == sorted(
        _in_memory_operations(reader.runs()).created, key=str
    )


# -- filters --------------------------------------------------------------------------------


def kept(catalog: Catalog, expression: str) -> list[str]:
    found, _ = catalog.models_page(expression, MAX_PAGE_SIZE, "", task_metadata_keys())
    return sorted(model["displayName"] for model, _ in found)


def expected(test: Any) -> list[str]:
    return sorted(e.model["displayName"] for e in ENTRIES if test(e))


def snake(key: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in key)


@pytest.mark.parametrize("task", TASKS)
def test_model_filters_by_task_in_either_syntax(catalog: Catalog, task: str) -> None:
    metadata = task_metadata_keys()[task]
    wanted = expected(lambda e: e.task == task)
    assert wanted and kept(catalog, f"task={task}") == wanted
    assert kept(catalog, f"{metadata}:*") == wanted  # camelCase
    assert kept(catalog, f"{snake(metadata)}:*") == wanted  # AutoML's documented snake_case
    assert kept(catalog, f"{snake(metadata)} : *") == wanted


def test_model_filters_by_the_clis_and_automls_terms(catalog: Catalog) -> None:
    versatile = expected(lambda e: e.model_type == TYPES[1])
    assert kept(catalog, f"model_type={TYPES[1]}") == versatile
    assert kept(catalog, "display_name=model_7") == ["model_7"]
    assert kept(catalog, "display_name='model_7'") == ["model_7"]
    on_a = expected(lambda e: e.model["datasetId"] == DATASETS[0])
    assert kept(catalog, f"dataset_id={DATASETS[0]}") == on_a
    assert kept(catalog, f'dataset_id != "{DATASETS[0]}"') == expected(
        lambda e: e.model["datasetId"] != DATASETS[0]
    )
    first = TASKS[0]
    both = expected(lambda e: e.task == first and e.model["datasetId"] == DATASETS[0])
    metadata = snake(task_metadata_keys()[first])
    assert kept(catalog, f"{metadata}:* AND dataset_id={DATASETS[0]}") == both
    assert kept(catalog, f"task={first} dataset_id={DATASETS[0]}") == both  # AND unsaid
    assert kept(catalog, "display_name=model_7 AND display_name=model_8") == []


def test_a_filtered_list_pages_too(catalog: Catalog) -> None:
    expression = f"model_type={TYPES[0]}"
    pages, _ = every_page(catalog.models_page, 3, filter=expression)
    listed = [name for found in pages for name in names(found)]
    order = newest_first(ENTRIES, "model")
    assert listed == [e.model["name"] for e in order if e.model_type == TYPES[0]]


def test_operation_filters(catalog: Catalog) -> None:
    def kept_operations(expression: str) -> list[str]:
        return sorted(op["name"] for op in catalog.operations_page(expression, 0, "")[0])

    def wanted(test: Any) -> list[str]:
        return sorted(e.operation["name"] for e in ENTRIES if test(e))

    assert kept_operations("done=true") == wanted(lambda e: e.operation["done"])
    assert kept_operations("done = false") == wanted(lambda e: not e.operation["done"])
    target = ENTRIES[4]
    for works_on in (target.model["name"], f"models/{model_id(4)}", model_id(4)):
        assert kept_operations(f"worksOn = {works_on}") == [target.operation["name"]]
        assert kept_operations(f"worksOn={works_on} AND done=false") == []


@pytest.mark.parametrize(
    ("list_name", "expression", "needles"),
    [
        ("models", "colour=red", ["term 'colour=red' is not understood", "model_type=TYPE",
                                  "dataset_id!=ID", "task=TASK", "_model_metadata:*"]),
        ("models", "text_model_metadata:*", ["not understood", "_model_metadata:*"]),
        ("models", "task=painting", ["task='painting' is not a task", TASKS[0]]),
        ("models", "display_name=", ["'display_name=' is not a term"]),
        ("models", "model_type=x AND", ["'AND' is not a term"]),
        ("operations", "done=maybe", ["done='maybe'", "done=true or done=false"]),
        ("operations", "state=RUNNING", ["not understood", "done=true", "worksOn=models/ID"]),
    ],
)  # fmt: skip
def test_a_bad_filter_is_one_line_naming_what_is_allowed(
    catalog: Catalog, list_name: str, expression: str, needles: list[str]
) -> None:
    read = catalog.models_page if list_name == "models" else catalog.operations_page
    keys = {"task_keys": task_metadata_keys()} if list_name == "models" else {}
    with pytest.raises(UserError) as raised:
        read(expression, 0, "", **keys)
    message = str(raised.value)
    assert message.startswith("filter ") and "\n" not in message
    assert all(needle in message for needle in needles), message


# -- bad sizes and tokens -------------------------------------------------------------------


@pytest.mark.parametrize("size", [-1, MAX_PAGE_SIZE + 1])
def test_a_bad_page_size_is_one_line(catalog: Catalog, size: int) -> None:
    with pytest.raises(UserError, match=f"pageSize {size} is out of range: use 1 to 1000"):
        catalog.models_page("", size, "")


def test_a_bad_page_token_is_one_line(catalog: Catalog) -> None:
    _, token = catalog.models_page("", 2, "")
    _, operations_token = catalog.operations_page("", 2, "")
    for bad in ("garbage!", "e30", token[:-3], operations_token):  # e30: "{}", no cursor
        with pytest.raises(UserError, match="is not a page token of the models list"):
            catalog.models_page("", 2, bad)
    with pytest.raises(UserError, match="was given with another filter"):
        catalog.models_page(f"model_type={TYPES[0]}", 2, token)
    assert catalog.models_page("  ", 2, token)[0]  # the same filter, spaced otherwise


def test_a_parent_lists_its_own(catalog: Catalog) -> None:
    from trainer.store.catalog import _under

    elsewhere = "projects/other/locations/eu"
    assert len(catalog.models_page("", 0, "", parent=LOCAL)[0]) == MODELS
    assert catalog.models_page("", 0, "", parent=elsewhere) == ([], "")
    assert len(catalog.operations_page("", 0, "", parent=LOCAL)[0]) == MODELS
    assert catalog.operations_page("", 0, "", parent=elsewhere) == ([], "")
    assert _under("models/ICN1", LOCAL) and not _under("models/ICN1", elsewhere)  # older names
    _, token = catalog.models_page("", 2, "", parent=LOCAL)
    with pytest.raises(UserError, match="is not a page token of the models list"):
        catalog.models_page("", 2, token, parent=elsewhere)


# -- the CLI --------------------------------------------------------------------------------


def cli(store: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any, *args: str) -> Any:
    ran = cli_in_process(store, monkeypatch, capsys, *args)
    assert ran.returncode == 0, ran.stderr
    return ran


def table_ids(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines()[1:]]


def test_the_cli_pages_with_the_token_on_stderr(store: Path, monkeypatch, capsys) -> None:
    order = [e.model["name"].rsplit("/", 1)[1] for e in newest_first(ENTRIES, "model")]
    first = cli(store, monkeypatch, capsys, "models", "list", "--page-size", "10")
    assert table_ids(first.stdout) == order[:10]
    (line,) = [line for line in first.stderr.splitlines() if "next page" in line]
    assert line.startswith("next page: --page-token ")
    token = line.split()[-1]
    rest = cli(store, monkeypatch, capsys, "models", "list", "--page-size", "20",
               "--page-token", token)  # fmt: skip
    assert table_ids(rest.stdout) == order[10:] and "next page" not in rest.stderr


def test_the_cli_lists_every_entry_with_all(store: Path, monkeypatch, capsys) -> None:
    listed = cli(store, monkeypatch, capsys, "models", "list", "--all", "--page-size", "2")
    assert len(table_ids(listed.stdout)) == MODELS and "next page" not in listed.stderr
    operations = cli(store, monkeypatch, capsys, "operations", "list", "--all", "--json")
    assert len(json.loads(operations.stdout)["operations"]) == MODELS


def test_the_json_carries_next_page_token(store: Path, monkeypatch, capsys) -> None:
    for verb, key in (("models", "model"), ("operations", "operations")):
        first = json.loads(cli(store, monkeypatch, capsys, verb, "list", "--json",
                               "--page-size", "20").stdout)  # fmt: skip
        assert set(first) == {key, "nextPageToken"} and len(first[key]) == 20
        last = cli(store, monkeypatch, capsys, verb, "list", "--json", "--page-token",
                   first["nextPageToken"])  # fmt: skip
        assert set(json.loads(last.stdout)) == {key}  # omitted after the last page
        assert len(json.loads(last.stdout)[key]) == MODELS - 20


def test_the_cli_takes_automls_filter_syntax(store: Path, monkeypatch, capsys) -> None:
    metadata = snake(task_metadata_keys()[TASKS[1]])
    listed = cli(store, monkeypatch, capsys, "models", "list", "--json", "--filter",
                 f"{metadata}:* AND model_type={TYPES[1]}")  # fmt: skip
    found = sorted(m["displayName"] for m in json.loads(listed.stdout)["model"])
    assert found == expected(lambda e: e.task == TASKS[1] and e.model_type == TYPES[1])
    name = ENTRIES[2].model["name"]
    works_on = cli(store, monkeypatch, capsys, "operations", "list", "--json", "--filter",
                   f"worksOn = {name} AND done=true")  # fmt: skip
    assert [op["name"] for op in json.loads(works_on.stdout)["operations"]] == [
        ENTRIES[2].operation["name"]
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["models", "list", "--page-size", "1001"], "--page-size 1001 is out of range"),
        (["operations", "list", "--page-size", "-5"], "--page-size -5 is out of range"),
        (["models", "list", "--page-token", "nope"], "--page-token 'nope' is not a page token"),
        (["models", "list", "--filter", "colour=red"], "--filter term 'colour=red'"),
        (["operations", "list", "--filter", "done=maybe"], "--filter done='maybe'"),
    ],
)
def test_the_clis_bad_arguments_are_one_line(
    store: Path, monkeypatch, capsys, args: list[str], needle: str
) -> None:
    refused = cli_in_process(store, monkeypatch, capsys, *args)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert needle in line, line


def test_a_long_table_prints_as_rich_prints_it_off_a_terminal(capsys) -> None:
    from trainer.cli import RICH_ROWS_AT_MOST, print_columns, print_table

    headers = ["ID", "display name", "x"]
    rows = [[f"ICN{i}", "n" * (i % 7), str(i)] for i in range(RICH_ROWS_AT_MOST)]
    print_table(headers, rows)  # rich's, at most RICH_ROWS_AT_MOST rows
    by_rich = capsys.readouterr().out
    print_columns(headers, rows)
    assert capsys.readouterr().out == by_rich


# -- the task configs, parsed once ----------------------------------------------------------


def test_task_configs_are_parsed_once_for_many_models(
    store: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import yaml

    from trainer import tasks

    parsed = []
    real = yaml.safe_load

    def counting(text: Any) -> Any:
        found = real(text)
        if isinstance(found, dict) and "metadata_key" in found:  # a conf/task/*.yaml
            parsed.append(found["name"])
        return found

    monkeypatch.setattr(yaml, "safe_load", counting)
    tasks._parsed_task_configs.cache_clear()
    tasks.task_metadata_keys.cache_clear()
    try:
        for _ in range(2):
            listed = cli(store, monkeypatch, capsys, "models", "list", "--all", "--filter",
                         f"task={TASKS[0]}")  # fmt: skip
            assert table_ids(listed.stdout)
            assert len(cli(store, monkeypatch, capsys, "models", "list").stdout.splitlines()) > 20
    finally:
        tasks._parsed_task_configs.cache_clear()
        tasks.task_metadata_keys.cache_clear()
    assert sorted(parsed) == TASKS  # each file once, for four lists of 26 models


def test_task_configs_cannot_be_changed_by_a_caller() -> None:
    configs = task_configs()
    configs[TASKS[0]]["metadata_key"] = "changed"
    configs.clear()
    assert task_configs()[TASKS[0]]["metadata_key"] == task_metadata_keys()[TASKS[0]]
    with pytest.raises(TypeError):
        task_metadata_keys()[TASKS[0]] = "changed"  # type: ignore[index]


def test_logging_of_bad_times_is_for_the_page_shown(
    catalog: Catalog, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        catalog.models_page("", 5, "")
    assert not [r for r in caplog.records if model_id(BAD_TIME) in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        catalog.models_page("", 0, "")
    assert [r for r in caplog.records if model_id(BAD_TIME) in r.getMessage()]
