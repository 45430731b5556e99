"""`python -m trainer datasets create|import|list|get|delete`: AutoML's datasets from the command
line, through the functions of trainer/datasets.py that the API server calls too.

The parser is built with the CLI's (nothing heavy is imported for it); the verbs import
trainer/datasets.py when they run. Reads import neither torch nor MLflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from trainer.errors import UserError
from trainer.settings import Workspace
from trainer.tasks import task_configs

PrintTable = Callable[[list[str], list[list[str]]], None]
PrintFields = Callable[[dict[str, Any]], None]


def add_dataset_verbs(resources: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    datasets = resources.add_parser("datasets", help="datasets: import rows, label stats")
    verbs = datasets.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="a new, empty dataset")
    create.add_argument("--display-name", required=True, help="up to 32 letters, digits and _")
    create.add_argument("--task", required=True, choices=sorted(task_configs()))
    create.add_argument(
        "--classification-type", default=None, metavar="TYPE",
        help="image classification: MULTICLASS (the default: one label an image) or MULTILABEL",
    )  # fmt: skip
    create.add_argument("--description", default="")
    create.add_argument("--json", action="store_true", help="the Dataset resource as JSON")
    imported = verbs.add_parser(
        "import", help="add rows (AutoML's importData): CSV files in the task's form, or a "
        "folder of one sub-folder per label for image classification",
    )  # fmt: skip
    imported.add_argument("id", help="a dataset ID or name")
    imported.add_argument("uris", nargs="+", metavar="URI", help="local paths or file:// URIs")
    imported.add_argument(
        "--detach", action="store_true",
        help="print the operation's name at once; the import runs in the background",
    )  # fmt: skip
    # The background process of --detach (and of the API server) carries on that operation.
    imported.add_argument("--operation", default=None, help=argparse.SUPPRESS)
    listing = verbs.add_parser("list", help="list datasets, newest first")
    listing.add_argument("--json", action="store_true", help="AutoML's ListDatasetsResponse")
    get = verbs.add_parser("get", help="one dataset: its label stats and AutoML's advice")
    get.add_argument("id", help="a dataset ID (ICN123...) or name (projects/P/locations/L/...)")
    get.add_argument("--json", action="store_true", help="the Dataset resource alone")
    delete = verbs.add_parser("delete", help="delete a dataset and its rows")
    delete.add_argument("id")


def run_dataset_verb(
    args: argparse.Namespace, home: str, print_table: PrintTable, print_fields: PrintFields
) -> None:
    workspace = Workspace(home=home, tracking_uri=args.tracking_uri,
                          experiment_name=args.experiment)  # fmt: skip
    verbs: dict[str, Callable[[Workspace, argparse.Namespace], None]] = {
        "create": _create, "import": _import, "delete": _delete,
        "list": lambda w, a: _list(w, a, print_table),
        "get": lambda w, a: _get(w, a, print_table, print_fields),
    }  # fmt: skip
    verbs[args.verb](workspace, args)


def _create(workspace: Workspace, args: argparse.Namespace) -> None:
    from trainer.datasets import create_dataset

    created = create_dataset(
        workspace, args.display_name, args.task, args.classification_type, args.description
    )
    if args.json:
        print(json.dumps(created.dataset, indent=2))
        return
    print(created.dataset["name"])
    print(f"created an empty {args.task} dataset; import rows with: python -m trainer datasets "
          f"import {created.dataset['name'].rsplit('/', 1)[-1]} FILE", file=sys.stderr)  # fmt: skip


def _import(workspace: Workspace, args: argparse.Namespace) -> None:
    from trainer.datasets import begin_import, get_dataset, import_data, import_log, run_import

    if args.detach:
        operation = begin_import(workspace, args.id, args.uris)
        print(operation["name"])
        log = import_log(workspace, operation["name"].rsplit("/", 1)[-1])
        print(f"importing in the background; log: {log}", file=sys.stderr)
        return
    if args.operation:
        operation = run_import(workspace, args.id, args.uris, args.operation)
    else:
        operation = import_data(workspace, args.id, args.uris)
    print(operation["name"])
    for failure in operation["metadata"].get("partialFailures", []):
        print(f"warning: row not imported: {failure['message']}", file=sys.stderr)
    if "error" in operation:
        raise UserError(f"import {operation['name']} failed: {operation['error']['message']}")
    dataset = get_dataset(workspace, args.id)
    print(f"dataset {dataset['name']} holds {dataset['exampleCount']} examples; python -m "
          f"trainer datasets get {args.id} shows its label stats", file=sys.stderr)  # fmt: skip


def _delete(workspace: Workspace, args: argparse.Namespace) -> None:
    from trainer.datasets import delete_dataset

    operation = delete_dataset(workspace, args.id)
    print(f"deleted datasets/{args.id.rsplit('/', 1)[-1]} ({operation['name']})")


def _list(workspace: Workspace, args: argparse.Namespace, print_table: PrintTable) -> None:
    from trainer.store.datasets import DatasetStore

    records = DatasetStore(workspace).records()
    if args.json:  # AutoML's ListDatasetsResponse
        print(json.dumps({"datasets": [record.resource for record in records]}, indent=2))
        return
    rows = [
        [
            record.dataset_id,
            record.resource["displayName"],
            record.task,
            str(record.resource.get("exampleCount", 0)),
            record.resource["createTime"][:19].replace("T", " "),
        ]
        for record in records
    ]
    print_table(["ID", "display name", "task", "examples", "created (UTC)"], rows)


def _get(
    workspace: Workspace, args: argparse.Namespace, print_table: PrintTable,
    print_fields: PrintFields,
) -> None:  # fmt: skip
    from trainer.datasets import label_stats
    from trainer.store.datasets import DatasetStore

    record = DatasetStore(workspace).record(args.id)
    if args.json:
        print(json.dumps(record.resource, indent=2))
        return
    stats = label_stats(workspace, args.id)
    print_fields({**_flat(record.resource), "task": record.task, "adequate": stats["adequate"]})
    print()
    print_table(*_stats_table(stats))
    for advice in stats["advice"]:
        print(f"advice: {advice['code']}: {advice['message']}")


def _flat(dataset: dict[str, Any]) -> dict[str, Any]:
    """The Dataset's fields, its metadata field shown as its values (or its name alone)."""
    fields = {}
    for key, value in dataset.items():
        if key.endswith("DatasetMetadata"):
            fields["metadata"] = " ".join(f"{k}={v}" for k, v in value.items()) or key
        else:
            fields[key] = value
    return fields


def _stats_table(stats: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per label, its examples in each split (as the rows' ML_USE says) and in all, and its
    boxes where the dataset has boxes."""
    splits = list(stats["splits"])
    boxes = any("boxes" in label for label in stats["labels"])
    headers = ["label", *splits, f"{stats['unit']}s", *(["boxes"] if boxes else [])]
    rows = [
        [label["displayName"], *(str(label["splits"][split]) for split in splits),
         str(label["exampleCount"]), *([str(label["boxes"])] if boxes else [])]
        for label in stats["labels"]
    ]  # fmt: skip
    totals = [str(stats["splits"][split]) for split in splits]
    rows.append(["(all)", *totals, str(stats["exampleCount"]), *([""] if boxes else [])])
    return headers, rows
