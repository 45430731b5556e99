"""``python -m trainer sweeps list|get|cancel|resume``: sweeps as the other verbs show resources,
a table or ``--json``. They read the sweep's folder under the home; ``cancel`` also asks the
running trials to stop through the store, as ``operations cancel`` does."""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.settings import redact
from trainer.sweep import liveness, record
from trainer.sweep.record import SweepRecord, SweepStatus

PrintTable = Callable[[list[str], list[list[str]]], None]
PrintFields = Callable[[dict[str, Any]], None]

CANCEL_WAIT_SECONDS = 300  # a trial stops within seconds of a cancel: checkpoint, cost, exit


def add_sweep_verbs(resources: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sweeps = resources.add_parser("sweeps", help="hyperparameter sweeps under one budget")
    # None: the home a training uses (the CLI fills in its Workspace's).
    sweeps.add_argument("--home", default=None, help="(default: $VISION_TRAINER_HOME)")
    verbs = sweeps.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="list sweeps")
    listing.add_argument("--json", action="store_true")
    get = verbs.add_parser("get", help="one sweep: its trials, cost and best model")
    get.add_argument("id", help="a sweep ID, bare or sweeps/SWP123")
    get.add_argument("--json", action="store_true")
    cancel = verbs.add_parser("cancel", help="stop a sweep and its running trials")
    cancel.add_argument("id")
    resume = verbs.add_parser("resume", help="go on with a stopped sweep")
    resume.add_argument("id")
    resume.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="sweep.budget_milli_node_hours=M: a new total; sweep.storage=URL: the study's "
        "storage with the credentials that sweep.json does not keep",
    )  # fmt: skip


def run_sweep_verb(
    args: argparse.Namespace, print_table: PrintTable, print_fields: PrintFields
) -> None:
    verbs: dict[str, Callable[[argparse.Namespace, PrintTable, PrintFields], None]] = {
        "list": _list, "get": _get, "cancel": _cancel, "resume": _resume,
    }  # fmt: skip
    verbs[args.verb](args, print_table, print_fields)


def _list(args: argparse.Namespace, print_table: PrintTable, print_fields: PrintFields) -> None:
    root = record.sweeps_root(args.home)
    folders = sorted(root.glob("*/sweep.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    sweeps = [record.summary(path.parent) for path in folders]
    if args.json:
        print(json.dumps({"sweeps": [s.to_json(trials=False) for s in sweeps]}, indent=2))
        return
    rows = [[s.sweep.id, s.sweep.status.value, str(s.budget), str(s.cost), str(len(s.trials)),
             s.best.model if s.best else "", s.sweep.create_time[:19].replace("T", " ")]
            for s in sweeps]  # fmt: skip
    print_table(["ID", "status", "budget", "cost", "trials", "best model", "created (UTC)"], rows)


def _get(args: argparse.Namespace, print_table: PrintTable, print_fields: PrintFields) -> None:
    summary = record.summary(record.sweep_folder(args.home, args.id))
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return
    sweep = summary.sweep
    print_fields({
        "name": sweep.name, "status": sweep.status.value, "budgetMilliNodeHours": summary.budget,
        "costMilliNodeHours": summary.cost, "grantedMilliNodeHours": summary.granted,
        "rungs": list(sweep.rungs), "monitor": sweep.monitor,
        "bestModelId": summary.best.model if summary.best else "", "createTime": sweep.create_time,
    })  # fmt: skip
    params = sorted({key for trial in summary.trials for key in trial.params})
    rows = [
        [str(t.number), *(_short(t.params.get(k)) for k in params), str(t.rung), str(t.cost),
         _short(t.value), t.state.value, t.model]
        for t in summary.trials
    ]  # fmt: skip
    print_table(["trial", *params, "rung", "cost", sweep.monitor, "state", "model"], rows)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cancel(args: argparse.Namespace, print_table: PrintTable, print_fields: PrintFields) -> None:
    """Ask the sweep to stop; it cancels its running trials and settles them. A sweep whose
    process is gone has its trials cancelled here, and settled by ``sweeps resume``."""
    folder = record.sweep_folder(args.home, args.id)
    sweep = record.read_sweep(folder)
    if sweep.status is not SweepStatus.RUNNING:
        raise UserError(
            f"sweep {args.id} has already ended ({sweep.status.value}): nothing to cancel"
        )
    sweep = replace(sweep, cancel_requested=True)
    record.write_sweep(folder, sweep)
    if not liveness.sweep_running(folder, sweep.pid):
        _cancel_trials(folder, sweep, args.tracking_uri)
    deadline = time.monotonic() + CANCEL_WAIT_SECONDS
    while time.monotonic() < deadline and _still_running(folder, sweep):
        time.sleep(0.5)
    if _still_running(folder, sweep):
        raise UserError(f"sweep {args.id} asked to stop, still running after "
                        f"{CANCEL_WAIT_SECONDS} s: see its trials' logs in {folder}")  # fmt: skip
    print(f"cancelled {sweep.name}")


def _cancel_trials(folder: Path, sweep: SweepRecord, tracking_uri: str) -> None:
    from trainer.store.catalog import Catalog

    catalog = Catalog(record.with_credentials(sweep.tracking_uri, tracking_uri), sweep.experiment)
    for trial in record.read_trials(folder):
        if trial.alive():
            with contextlib.suppress(UserError):  # ended meanwhile
                catalog.cancel(trial.operation)


def _still_running(folder: Path, sweep: SweepRecord) -> bool:
    trials = record.read_trials(folder)
    return liveness.sweep_running(folder, sweep.pid) or any(t.alive() for t in trials)


def _resume(args: argparse.Namespace, print_table: PrintTable, print_fields: PrintFields) -> None:
    given = dict(_resume_override(o) for o in args.overrides)
    budget = given.get("sweep.budget_milli_node_hours")
    import logging

    from trainer.sweep.runner import resume_sweep

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    resume_sweep(
        args.home, args.id, None if budget is None else int(budget), args.tracking_uri,
        given.get("sweep.storage"),
    )  # fmt: skip


def _resume_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    if key == "sweep.budget_milli_node_hours" and value.isdigit():
        return key, value
    if key == "sweep.storage" and value:
        return key, value
    raise UserError(f"{redact(override)!r}: give the new total as sweep.budget_milli_node_hours=M "
                    "(and the study's storage as sweep.storage=URL)")  # fmt: skip
