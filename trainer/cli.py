"""The management verbs: `python -m trainer models ...`, `operations ...`, `weights ...`,
`sweeps ...`.

A plain argparse CLI rather than Hydra: these verbs read and change the store, they take no
training config, and they must answer quickly, so nothing here imports torch or Lightning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from trainer import front_door
from trainer.dataset_verbs import add_dataset_verbs, run_dataset_verb
from trainer.errors import UserError
from trainer.export_common import QUANTIZATIONS, check_format
from trainer.server.main import add_serve_verb
from trainer.settings import Workspace, redact
from trainer.store.automl import progress_of, resource_id
from trainer.store.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, ListRequestError
from trainer.sweep.verbs import add_sweep_verbs, run_sweep_verb
from trainer.tasks import add_predict_options, task_metadata_keys, task_name_of_model
from trainer.weights import add_weights_verbs, download


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        usage=front_door.USAGE,
        description=front_door.description(),
        epilog=front_door.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # The same store and experiment a training uses: conf/config.yaml's mlflow settings.
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="the MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument(
        "--experiment",
        default=None,
        help="the MLflow experiment of operations (default: $MLFLOW_EXPERIMENT_NAME or "
        "vision-trainer, as a training's mlflow.experiment_name)",
    )
    resources = parser.add_subparsers(dest="resource", required=True)

    models = resources.add_parser("models", help="trained models").add_subparsers(
        dest="verb", required=True
    )
    listing = models.add_parser("list", help="list models, newest first, a page at a time")
    listing.add_argument(
        "--filter", default="",
        help="task=..., model_type=..., display_name=..., or AutoML's <task>_model_metadata:*, "
        "dataset_id=ID, dataset_id!=ID; terms joined by AND",
    )  # fmt: skip
    listing.add_argument("--json", action="store_true", help="AutoML's ListModelsResponse")
    add_paging(listing)
    get = models.add_parser("get", help="one model")
    get.add_argument(
        "id", help="a model ID (ICN123) or name (projects/P/locations/L/models/ICN123)"
    )
    get.add_argument("--json", action="store_true")
    delete = models.add_parser("delete", help="delete a model, its artifacts and checkpoints")
    delete.add_argument("id")
    evaluate = models.add_parser("evaluate", help="evaluate a model again and record it")
    evaluate.add_argument("id")
    evaluate.add_argument(
        "--dataset", help="another labelled dataset (all of it); default: the model's TEST split"
    )
    evaluations = models.add_parser("evaluations", help="a model's recorded evaluations")
    evaluations.add_argument("id")
    evaluations.add_argument(
        "--json", action="store_true", help="every ModelEvaluation resource, per label too"
    )
    export = models.add_parser(
        "export", help="an ONNX, TorchScript or TF Lite package for devices, or a Docker "
        "image's folder",
    )  # fmt: skip
    export.add_argument("id")
    export.add_argument(
        "--format", default="onnx",
        help="onnx, torchscript, tflite (the extra vision-trainer[tflite]) or docker (a folder "
        "with the model, the model server's Dockerfile and entrypoint); conf/export.yaml",
    )  # fmt: skip
    export.add_argument(
        "--quantize", default="none", choices=QUANTIZATIONS,
        help="tflite: int8 is full-integer, calibrated on TRAIN images",
    )  # fmt: skip
    export.add_argument("--output", default="exports", help="folder for the package")
    deploy = models.add_parser(
        "deploy", help="serve a model's online prediction on this machine (AutoML and TF Serving)"
    )
    deploy.add_argument("id")
    deploy.add_argument(
        "--node-count", type=int, default=None,
        help="serving workers on a CPU; a GPU machine has one per device (default: "
        "conf/serve.yaml's online.node_count)",
    )  # fmt: skip
    undeploy = models.add_parser("undeploy", help="stop a deployed model's server")
    undeploy.add_argument("id")

    predict = resources.add_parser("predict", help="batch prediction over a CSV of images")
    predict.add_argument("id", help="a model ID, bare or models/ICN123")
    predict.add_argument(
        "--input", required=True,
        help="CSV: one image path per line (local, or a URL with --allow-remote), at most "
        "max_rows of conf/predict.yaml",
    )  # fmt: skip
    predict.add_argument("--output", required=True, help="folder for the prediction folder")
    predict.add_argument("--score-threshold", type=float, default=0.5)
    predict.add_argument("--shard-size", type=int, default=1000, help="images per JSONL file")
    predict.add_argument(
        "--workers", type=int, default=None,
        help="decoding processes: 0 (the main process) to max_workers of conf/predict.yaml",
    )  # fmt: skip
    predict.add_argument(
        "--allow-remote", action="store_true",
        help="also read http, https, gs and s3 rows (videos: http, https), each read given "
        "remote_timeout_seconds of conf/predict.yaml to connect and for each piece of data; "
        "without it only local files are read. Other schemes (tcp:, concat:, pipe:, a::b ...), "
        "FIFOs and devices always fail their own row",
    )  # fmt: skip
    add_predict_options(predict)  # each task's own flags

    operations = resources.add_parser("operations", help="trainings").add_subparsers(
        dest="verb", required=True
    )
    listing = operations.add_parser("list", help="list operations, newest first, a page at a time")
    listing.add_argument(
        "--filter", default="", help="done=true|false, worksOn=models/ID; terms joined by AND"
    )
    listing.add_argument("--json", action="store_true", help="AutoML's ListOperationsResponse")
    add_paging(listing)
    get = operations.add_parser("get", help="one operation")
    get.add_argument("id", help="an operation ID, bare or operations/ICN123")
    get.add_argument("--json", action="store_true")
    cancel = operations.add_parser("cancel", help="stop a training cooperatively")
    cancel.add_argument("id")
    add_weights_verbs(resources)
    add_sweep_verbs(resources)
    add_dataset_verbs(resources)
    add_serve_verb(resources)
    return parser


def add_paging(listing: argparse.ArgumentParser) -> None:
    """The paging flags of a list, as AutoML's List methods page (pageSize, pageToken)."""
    listing.add_argument(
        "--page-size", type=int, default=0,
        help=f"entries per page (default {DEFAULT_PAGE_SIZE}, at most {MAX_PAGE_SIZE})",
    )  # fmt: skip
    listing.add_argument(
        "--page-token", default="",
        help="the page after the one that gave it (printed on stderr, or the JSON's nextPageToken)",
    )  # fmt: skip
    listing.add_argument("--all", action="store_true", help="every entry, in one list")


# What the API names a list's arguments (listing.ListRequestError), as the CLI's flags.
FLAGS = {"filter": "--filter", "pageSize": "--page-size", "pageToken": "--page-token"}


def list_page(
    read: Callable[[int | None, str], tuple[list, str]], args: argparse.Namespace
) -> tuple[list, str]:
    """One page of a list (``read(page_size, page_token)``; every entry with --all), a bad
    argument named by its flag."""
    try:
        return read(None if args.all else args.page_size, args.page_token)
    except ListRequestError as error:
        raise UserError(f"{FLAGS[error.argument]} {error.problem}") from None


def next_page(token: str) -> dict[str, str]:
    """``nextPageToken`` as AutoML's List responses have it: omitted after the last page."""
    return {"nextPageToken": token} if token else {}


def say_next_page(token: str) -> None:
    # On stderr: stdout stays the table that scripts read.
    if token:
        print(f"next page: --page-token {token}", file=sys.stderr)


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    # What a flag leaves unsaid is what a training would use: conf/config.yaml, read once.
    workspace = Workspace.current()
    args.tracking_uri = args.tracking_uri or workspace.tracking_uri.reveal()
    args.experiment = args.experiment or workspace.experiment_name
    if getattr(args, "home", "") is None:
        args.home = workspace.home
    from trainer.store.catalog import Catalog

    try:
        if args.resource == "weights":  # the torch hub cache, not the store
            download(args)
            return 0
        if args.resource == "sweeps":  # the sweep's folder under the home
            run_sweep_verb(args, print_table, print_fields)
            return 0
        if args.resource == "datasets":  # trainer/datasets.py: the API server's functions too
            run_dataset_verb(args, workspace.home, print_table, print_fields)
            return 0
        if args.resource == "serve":  # until stopped
            from trainer.server.main import run_server

            run_server(args, workspace)
            return 0
        catalog = Catalog(args.tracking_uri, args.experiment)
        handler = HANDLERS[(args.resource, getattr(args, "verb", None))]
        handler(catalog, args)
        sys.stdout.flush()
    except UserError as error:
        print(f"error: {redact(error)}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:
        # The reader went away (`... --json | head`): end quietly, as Unix tools do. Python's
        # own flush of stdout at exit would fail again, so stdout points at /dev/null now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


# -- models -------------------------------------------------------------------------------


def models_list(catalog: Any, args: argparse.Namespace) -> None:
    def read(page_size: int | None, page_token: str) -> tuple[list, str]:
        return catalog.models_page(args.filter, page_size, page_token, task_metadata_keys())

    models, token = list_page(read, args)
    if args.json:  # AutoML's ListModelsResponse
        listed = {"model": [model for model, _ in models], **next_page(token)}
        print(json.dumps(listed, indent=2))
        return
    rows = []
    for model, meta in models:
        rows.append(
            [
                resource_id(model["name"]),
                model["displayName"],
                task_name_of_model(model),
                meta["modelType"],
                meta["trainBudgetMilliNodeHours"],
                meta["trainCostMilliNodeHours"],
                meta["stopReason"],
                model["createTime"][:19].replace("T", " "),
            ]
        )
    headers = ["ID", "display name", "task", "model type", "budget", "cost", "stop reason",
               "created (UTC)"]  # fmt: skip
    print_table(headers, rows)
    say_next_page(token)


def models_get(catalog: Any, args: argparse.Namespace) -> None:
    from trainer.store.automl import details_of

    model, tags = catalog.model_and_tags(args.id)
    if args.json:  # the Model alone: its details are model_details.json's
        print(json.dumps(model, indent=2))
        return
    flat = {k: v for k, v in model.items() if not k.endswith("ModelMetadata")}
    print_fields({**flat, **details_of(model, tags)})


def models_delete(catalog: Any, args: argparse.Namespace) -> None:
    from trainer.serving.deployments import stop_before_delete

    stop_before_delete(catalog, args.id)
    print(f"deleted models/{catalog.delete_model(args.id)}")


def models_deploy(catalog: Any, args: argparse.Namespace) -> None:
    _quiet_logging()
    catalog.usable_model(args.id, "deployment")  # a wrong ID is refused before torch loads
    from trainer.serving.deployments import deploy_on_record, online_defaults

    node_count = args.node_count or online_defaults()["node_count"]
    deployment = deploy_on_record(catalog, args.id, node_count)
    print(
        f"model {deployment.model_id} answers on {deployment.url} ({node_count} worker(s)): "
        f"AutoML's POST /v1/projects/P/locations/L/models/{deployment.model_id}:predict, TF "
        "Serving's POST /v1/models/default:predict; models undeploy stops it",
        file=sys.stderr,
    )
    print(deployment.url)


def models_undeploy(catalog: Any, args: argparse.Namespace) -> None:
    from trainer.serving.deployments import undeploy_on_record

    print(f"undeployed models/{undeploy_on_record(catalog, args.id)}")


def models_evaluate(catalog: Any, args: argparse.Namespace) -> None:
    _quiet_logging()
    catalog.usable_model(args.id, "evaluation")  # a wrong ID is refused before torch loads
    from trainer.evaluate import evaluate_stored  # torch: only for this verb

    folder, headline = evaluate_stored(catalog, args.id, args.dataset)
    print_fields({**headline, "files": str(folder)})


def models_evaluations(catalog: Any, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"modelEvaluation": catalog.evaluation_resources(args.id)}, indent=2))
        return
    summaries = catalog.evaluations(args.id)
    standard = ("name", "createTime", "dataset", "evaluatedExampleCount")
    # The headline figures are the task's own (accuracy and auPrc, or mAP), in stored order.
    figures = [key for key in (summaries[0] if summaries else {}) if key not in standard]
    rows = [
        [
            resource_id(summary["name"]),
            summary["createTime"][:19].replace("T", " "),
            summary["dataset"],
            summary["evaluatedExampleCount"],
            *(f"{summary.get(key, float('nan')):.4f}" for key in figures),
        ]
        for summary in summaries
    ]
    print_table(["evaluation ID", "created (UTC)", "dataset", "examples", *figures], rows)


def _quiet_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


def models_export(catalog: Any, args: argparse.Namespace) -> None:
    from pathlib import Path

    _quiet_logging()
    # Refused before torch loads: a format not offered, a wrong ID, and (docker) a model that
    # cannot serve online.
    check_format(args.format)
    model, _ = catalog.usable_model(args.id, "export")
    if args.format == "docker":
        from trainer.serving.docker import check_servable

        check_servable(model)
    from trainer.export import export_stored  # torch: only for this verb

    output = Path(args.output).resolve()
    package = export_stored(catalog, args.id, args.format, output, args.quantize)
    metadata = json.loads((package / "metadata.json").read_text())
    print(f"exported to {package}: {export_summary(metadata)}", file=sys.stderr)
    print(package)


def export_summary(metadata: dict[str, Any]) -> str:
    """The figures of an export's verification, from its metadata.json."""
    verification = metadata["verification"]
    if metadata["format"] == "docker":
        return (f"its serving package loads ({verification['parameters']} parameters); build "
                f"the image in that folder: {metadata['build']}")  # fmt: skip
    figures = ", ".join(
        f"{key} {value:.2g}" if isinstance(value, float) else f"{key} {value}"
        for key, value in verification.items()
        if key not in ("inputs", "split")
    )
    return (
        f"verified on {verification['inputs']} TEST inputs ({figures}); "
        f"{metadata['latencyMs']['median']:.2f} ms at batch 1"
    )


def predict(catalog: Any, args: argparse.Namespace) -> None:
    _quiet_logging()
    import logging

    logging.getLogger("trainer").setLevel(logging.INFO)  # progress lines off a terminal
    catalog.usable_model(args.id, "prediction")  # a wrong ID is refused before torch loads
    from trainer.data.prediction import default_workers
    from trainer.predict import run_batch_prediction  # torch: only here

    args.workers = default_workers() if args.workers is None else args.workers
    result = run_batch_prediction(catalog, args)
    print(
        f"predicted {result.predicted} inputs, {result.failed} failed, in {result.seconds:.1f} s "
        f"({result.predicted / max(result.seconds, 1e-9):.1f} per second)",
        file=sys.stderr,
    )
    print(result.folder)


# -- operations ---------------------------------------------------------------------------


def operation_state(operation: dict[str, Any]) -> str:
    if not operation.get("done"):
        return "RUNNING"
    error = operation.get("error")
    if not error:
        return "SUCCEEDED"
    return {1: "CANCELLED", 10: "INTERRUPTED"}.get(error.get("code"), "FAILED")


def operations_list(catalog: Any, args: argparse.Namespace) -> None:
    def read(page_size: int | None, page_token: str) -> tuple[list, str]:
        return catalog.operations_page(args.filter, page_size, page_token)

    operations, token = list_page(read, args)
    if args.json:  # AutoML's ListOperationsResponse
        print(json.dumps({"operations": operations, **next_page(token)}, indent=2))
        return
    rows = [
        [
            resource_id(op["name"]),
            operation_state(op),
            f"{progress_of(op)}%",
            op["metadata"]["createTime"][:19].replace("T", " "),
            op["metadata"]["updateTime"][:19].replace("T", " "),
        ]
        for op in operations
    ]
    print_table(["ID", "state", "progress", "started (UTC)", "updated (UTC)"], rows)
    say_next_page(token)


def operations_get(catalog: Any, args: argparse.Namespace) -> None:
    operation = catalog.operation(args.id)
    if args.json:
        print(json.dumps(operation, indent=2))
        return
    fields = {
        "name": operation["name"],
        "state": operation_state(operation),
        **operation["metadata"],
        "done": operation["done"],
    }
    if "error" in operation:
        fields["error"] = f"{operation['error']['code']}: {operation['error']['message']}"
    if "name" in operation.get("response", {}):  # a Model; an import's response is Empty
        fields["model"] = operation["response"]["name"]
    fields.pop("createModelDetails", None)
    print_fields(fields)


def operations_cancel(catalog: Any, args: argparse.Namespace) -> None:
    name = catalog.cancel(args.id)
    print(f"cancel requested for {name}: it checkpoints and stops within a few seconds")


HANDLERS: dict[tuple[str, str], Callable[[Any, argparse.Namespace], None]] = {
    ("models", "list"): models_list,
    ("models", "get"): models_get,
    ("models", "delete"): models_delete,
    ("models", "evaluate"): models_evaluate,
    ("models", "evaluations"): models_evaluations,
    ("models", "export"): models_export,
    ("models", "deploy"): models_deploy,
    ("models", "undeploy"): models_undeploy,
    ("predict", None): predict,
    ("operations", "list"): operations_list,
    ("operations", "get"): operations_get,
    ("operations", "cancel"): operations_cancel,
}


# -- output -------------------------------------------------------------------------------


# rich lays a table out at about 0.5 ms a row (5 s for 10,000): a longer table is written as the
# plain columns rich writes off a terminal.
RICH_ROWS_AT_MOST = 200


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    if len(rows) > RICH_ROWS_AT_MOST:
        print_columns(headers, rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(*headers, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console = Console()
    if not console.is_terminal:
        console = Console(width=1000)  # scripts and pipes get whole cells, never truncated
    console.print(table)
    if not rows:
        print("(none)")


def print_columns(headers: list[str], rows: list[list[str]]) -> None:
    """A table as rich prints one off a terminal: every cell padded to its column's width, the
    columns two spaces apart."""
    cells = [headers, *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    sys.stdout.write("\n".join(lines) + "\n")


def print_fields(fields: dict[str, Any]) -> None:
    width = max(len(key) for key in fields)
    for key, value in fields.items():
        print(f"{key:<{width}}  {value}")
