"""Wall-clock of `python -m trainer models list` and `operations list` on a store of N models
(50 by default; `--models 10000` for the lists at scale), and of one page of each read in
process, as the API server reads it (no interpreter start-up), and the API server's list
routes over HTTP (one page; every page).

The store is built in a temporary folder: one real short training, then N - 1 more registered
models and their operations' runs copied from it, each a minute older than the one before (so
newest first is an order, not a tie). Each command runs `--repeats` times (7); the median is
printed. Targets on a 2-core CPU, at 10,000 models: the first page of either list under 1 s (the
CLI's, and one page in process), the whole list (`--all`) under 3 s.

    .venv/bin/python benchmarks/cli_latency.py [--models 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # the store's times, as trainer.store.resources writes them
COMMANDS = [
    ["models", "list"],
    ["models", "list", "--all"],
    ["models", "list", "--json"],
    ["operations", "list"],
    ["operations", "list", "--all"],
]


def trainer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=str(REPO), VISION_TRAINER_HOME=str(cwd / "home"))
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=cwd, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip


def train_one(cwd: Path) -> str:
    """One real short training into cwd's store; its model's ID."""
    from trainer.tasks.image_classification.demo import write_shapes

    write_shapes(cwd / "data", per_label=24, size=32, seed=7)
    trained = trainer(
        f"dataset.path={cwd / 'data'}", "model.input_size=[32,32]", "early_stopping.patience=2",
        "budget.min_milli_node_hours=1", "budget.train_budget_milli_node_hours=5", cwd=cwd,
    )  # fmt: skip
    return json.loads(trained.stdout)["name"].rsplit("/", 1)[1]


def earlier(timestamp: str, minutes: int) -> str:
    moment = datetime.strptime(timestamp, TIME_FORMAT).replace(tzinfo=timezone.utc)
    return (moment - timedelta(minutes=minutes)).strftime(TIME_FORMAT)


def rows_of(db: sqlite3.Connection, sql: str, key: str) -> list[dict[str, Any]]:
    return [dict(row) for row in db.execute(sql, (key,))]


def renamed(value: Any, names: dict[str, str]) -> Any:
    """A cell of a copied row with the original's IDs (model, operation, run) replaced."""
    if not isinstance(value, str):
        return value
    for old, new in names.items():
        value = value.replace(old, new)
    return value


def model_tags_of_copy(tags: dict[str, str], index: int) -> dict[str, str]:
    """The registry tags of copy ``index`` (IDs already renamed): named, and a minute older
    than the copy before it."""
    resource = json.loads(tags["model_json"])
    resource.update(displayName=f"copy_{index}", createTime=earlier(resource["createTime"], index))
    fields = {"display_name": resource["displayName"], "create_time": resource["createTime"]}
    return {**tags, **fields, "model_json": json.dumps(resource)}


def run_tags_of_copy(tags: dict[str, str], index: int) -> dict[str, str]:
    """The run tags of copy ``index`` (IDs already renamed): its Operation as much older as
    its model."""
    operation = json.loads(tags["operation_json"])
    metadata = operation["metadata"]
    for key in ("createTime", "updateTime"):
        metadata[key] = earlier(metadata[key], index)
    return {**tags, "operation_json": json.dumps(operation), "update_time": metadata["updateTime"]}


def copy_models(database: Path, original_id: str, count: int) -> None:
    """``count - 1`` copies of a registered model and its operation's run, written as rows of
    MLflow's own tables (the columns read from the original's rows, so the schema is MLflow's).

    Not MLflow's client: one create_registered_model and one create_run are two SQLAlchemy
    transactions, 40 ms a copy on this 2-core machine (10,000 copies: about 7 minutes of
    set-up); rows inserted in one transaction take seconds. The verbs read these same tables
    (trainer/store/reader.py). Model versions are not copied: no list reads them."""
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        (model,) = rows_of(db, "SELECT * FROM registered_models WHERE name = ?", original_id)
        model_tags = {r["key"]: r["value"] for r in rows_of(
            db, "SELECT * FROM registered_model_tags WHERE name = ?", original_id)}  # fmt: skip
        run_id = model_tags["run_id"]
        (run,) = rows_of(db, "SELECT * FROM runs WHERE run_uuid = ?", run_id)
        run_tags = {r["key"]: r["value"] for r in rows_of(
            db, "SELECT * FROM tags WHERE run_uuid = ?", run_id)}  # fmt: skip
        operation_id = run_tags["operation"].rsplit("/", 1)[1]
        tables: dict[str, list[dict[str, Any]]] = {
            "registered_models": [], "registered_model_tags": [], "runs": [], "tags": [],
        }  # fmt: skip
        for index in range(1, count):
            names = {
                original_id: f"{original_id[:3]}{9000000000000000000 + index}",
                operation_id: f"{operation_id[:3]}{8000000000000000000 + index}",
                run_id: uuid.uuid4().hex,
            }
            copied = {**model, "name": names[original_id]}
            tables["registered_models"].append({k: renamed(v, names) for k, v in copied.items()})
            tags = {k: renamed(v, names) for k, v in model_tags.items()}
            tables["registered_model_tags"] += [
                {"key": key, "value": value, "name": names[original_id]}
                | ({"workspace": model["workspace"]} if "workspace" in model else {})
                for key, value in model_tags_of_copy(tags, index).items()
            ]
            tables["runs"].append({k: renamed(v, names) for k, v in run.items()})
            tags = {k: renamed(v, names) for k, v in run_tags.items()}
            tables["tags"] += [
                {"key": key, "value": value, "run_uuid": names[run_id]}
                for key, value in run_tags_of_copy(tags, index).items()
            ]
        for table, rows in tables.items():
            if rows:  # none for --models 1
                insert(db, table, rows)


def insert(db: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    columns = list(rows[0])
    db.executemany(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
        [tuple(row[column] for column in columns) for row in rows],
    )


def median_seconds(*args: str, cwd: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer(*args, cwd=cwd)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def median_in_process(call: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def in_process_pages(cwd: Path, repeats: int) -> dict[str, float]:
    """One page of each list as the API server reads it: a Catalog (made afresh each time, as
    cheap as it is) asked for the first page at the default size."""
    from trainer.store.catalog import Catalog

    uri = f"sqlite:///{cwd / 'mlflow.db'}"

    def models() -> Any:
        return Catalog(uri, "vision-trainer").models_page("", 0, "")

    def operations() -> Any:
        return Catalog(uri, "vision-trainer").operations_page("", 0, "")

    return {
        "Catalog.models_page (in process)": median_in_process(models, repeats),
        "Catalog.operations_page (in process)": median_in_process(operations, repeats),
    }


def api_pages(cwd: Path, repeats: int) -> dict[str, float]:
    """The API server's list routes over HTTP (`python -m trainer serve` on this store): one page
    (AutoML's default size), and every entry by following nextPageToken at pageSize=1000."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=str(REPO), VISION_TRAINER_HOME=str(cwd / "home"))
    server = subprocess.Popen([sys.executable, "-m", "trainer", "serve", "--port", "0"], cwd=cwd,
                              env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert server.stdout is not None
        base = server.stdout.readline().strip() + "/v1/projects/local/locations/local"
        found = {}
        for collection, key in (("models", "model"), ("operations", "operations")):
            url = f"{base}/{collection}"
            found[f"GET {collection} (one page, API)"] = median_in_process(
                lambda url=url: fetch(url), repeats
            )
            found[f"GET {collection} (every page of 1000, API)"] = median_in_process(
                lambda url=url, key=key: every_page(url, key), repeats
            )
        return found
    finally:
        server.terminate()
        server.wait(timeout=30)


def fetch(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=60) as answer:
        return json.loads(answer.read())


def every_page(url: str, key: str) -> int:
    count, token = 0, ""
    while True:
        page = fetch(f"{url}?pageSize=1000" + (f"&pageToken={token}" if token else ""))
        count += len(page.get(key, []))
        token = page.get("nextPageToken", "")
        if not token:
            return count


def check_store(cwd: Path, count: int) -> None:
    listed = json.loads(trainer("models", "list", "--all", "--json", cwd=cwd).stdout)["model"]
    assert len(listed) == count, len(listed)
    operations = trainer("operations", "list", "--all", "--json", cwd=cwd).stdout
    assert len(json.loads(operations)["operations"]) == count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=50, help="models in the store (50)")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each command (7)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # in process too, this checkout's trainer (as the commands')
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        started = time.perf_counter()
        original = train_one(cwd)
        trained = time.perf_counter()
        copy_models(cwd / "mlflow.db", original, args.models)
        print(f"store: one training in {trained - started:.0f} s, {args.models - 1} copies in "
              f"{time.perf_counter() - trained:.1f} s")  # fmt: skip
        check_store(cwd, args.models)
        note = f"(median of {args.repeats}, {args.models} models)"
        for verb in COMMANDS:
            seconds = median_seconds(*verb, cwd=cwd, repeats=args.repeats)
            print(f"{'python -m trainer ' + ' '.join(verb):<45} {seconds:.3f} s {note}")
        for what, seconds in in_process_pages(cwd, args.repeats).items():
            print(f"{what:<45} {seconds:.3f} s {note}")
        for what, seconds in api_pages(cwd, args.repeats).items():
            print(f"{what:<45} {seconds:.3f} s {note}")


if __name__ == "__main__":
    main()
