"""Checking the composed config before any work, so a user's mistake costs nothing."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer import CONF_DIR
from trainer.errors import UserError
from trainer.settings import AUTO, MULTICLASS, MULTILABEL, Settings, Workspace
from trainer.store.automl import Parent
from trainer.store.resources import check_name
from trainer.tasks import default_task

GROUPS_CHECKED = ("task", "model_type")


def checked_settings(resolved: Mapping[str, Any]) -> Settings:
    """The composed config as typed settings, checked once at the entry point: the types and
    values (trainer/settings.py), then what needs the store's rules or the file system."""
    settings = Settings.parse(resolved)
    check_name("display_name", settings.display_name)
    if settings.dataset_id is not None:
        settings = _from_dataset(settings)
    path = settings.dataset.path
    if path is not None and not Path(path).expanduser().exists():
        raise UserError(
            f"dataset.path={path!r} does not exist; give a folder with one sub-folder "
            "per label or an AutoML CSV, or leave it out to use the bundled demo dataset"
        )
    parent(settings)  # resource names: the project and location must fit in one
    if settings.deploy_after_training and not settings.task.online_prediction:
        raise UserError(f"deploy_after_training=true: {settings.task.name} models predict in "
                        "batch only (python -m trainer predict); leave it out")  # fmt: skip
    return settings


def _from_dataset(settings: Settings) -> Settings:
    """The settings of a training on a dataset on record: its rows as ``dataset.path`` (a copy
    pinned to their version, trainer/store/datasets.py), its bare ID as ``dataset_id``, and its
    classificationType as ``dataset.classification_type`` (``auto`` would read a MULTILABEL
    dataset's rows of one label each as MULTICLASS); another type given is refused."""
    from trainer.store.datasets import rows_for_training

    rows = rows_for_training(
        Workspace.of(settings), str(settings.dataset_id), settings.task.name, settings.dataset.path
    )
    given, kind = settings.dataset.classification_type, rows.classification_type
    if kind is not None and given not in (AUTO, kind):
        raise UserError(
            f"dataset {rows.dataset_id} is a {kind} dataset but dataset.classification_type="
            f"{given}; leave it auto (or set {kind}) to train on it"
        )
    settings = settings.replace_in(
        "dataset", path=str(rows.path), classification_type=kind or given
    )
    return settings.model_copy(update={"dataset_id": rows.dataset_id})


def as_classification_type(settings: Settings, found: str) -> Settings:
    """An image classification's settings once its dataset reads as ``found`` (MULTICLASS or
    MULTILABEL): ``dataset.classification_type`` made it, and a MULTILABEL model's monitors
    (its task conf's ``multilabel``). A training settles them so (trainer/job/phases.py), and a
    sweep judges its trials by the same monitor."""
    settled = settings.replace_in("dataset", classification_type=found)
    task = settings.task
    if found != MULTILABEL or not task.multilabel:
        return settled
    # The MULTICLASS model's metric (val_accuracy), as settings not yet settled have it.
    if task.convergence_monitor == task.monitor != task.multilabel["monitor"]:
        raise UserError(
            f"task.convergence_monitor={task.convergence_monitor}: a MULTILABEL model does not "
            f"log it (it scores each label on its own); judge convergence on val_loss (the "
            f"default) or {task.multilabel['monitor']}"
        )
    return settled.replace_in("task", **task.multilabel)


def read_classification_type(settings: Settings) -> str | None:
    """What an image classification's dataset reads as, from its listing alone (no file is
    opened); None for a task of one label an example. The bundled demo is a folder."""
    from trainer.data.manifest import read_dataset

    if settings.task.multilabel is None:
        return None
    chosen, path = settings.dataset.classification_type, settings.dataset.path
    if chosen != AUTO or path is None:
        return MULTICLASS if chosen == AUTO else chosen
    return read_dataset(path, for_training=False, check_files=False,
                        classification_type=chosen).classification_type  # fmt: skip


def parent(settings: Settings) -> Parent:
    """Where the training's resources live: ``automl.project`` and ``automl.location``."""
    return Parent(settings.automl.project, settings.automl.location)


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_overrides(argv: list[str]) -> None:
    """Refuse malformed overrides and unknown groups before Hydra starts, with exit code 2."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    overrides = _without_flags(argv)
    try:
        OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        first = str(error).strip().splitlines()[0]
        _fail(f"cannot parse the override {first!r}; write key=value, quoting odd characters")
    check_group_choices(overrides)


def model_types(task: str) -> list[str]:
    """The model types a task offers: its files in conf/task_model/<task>/."""
    return sorted(p.stem for p in (CONF_DIR / "task_model" / task).glob("*.yaml"))


# Hydra's flags that take a value: `--cfg job` is a flag and its value, not an override.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name",
                     "-cn", "--config-dir", "-cd", "--experimental-rerun"}  # fmt: skip


def _without_flags(argv: list[str]) -> list[str]:
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next or arg.startswith("-"):
            skip_next = not skip_next and arg in _FLAGS_WITH_VALUE
            continue
        overrides.append(arg)
    return overrides


def check_group_choices(argv: list[str]) -> None:
    """Refuse an unknown task, or a model type the task does not offer, with exit code 2
    before Hydra composes anything.

    Hydra reports a missing config option with a multi-line error and exit code 1; users get
    one line that lists the choices instead.
    """
    choices: dict[str, list[str]] = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in GROUPS_CHECKED and "(" not in value:  # not a sweep function
            choices[key] = value.split(",")
    tasks = available("task")
    for task in choices.get("task", []):
        if task not in tasks:
            _fail(f"unknown task {task!r}; choose one of: {', '.join(tasks)}")
    for task in choices.get("task", [default_task()]):
        offered = model_types(task)
        for model_type in choices.get("model_type", []):
            if model_type not in offered:
                shown = ", ".join(t for t in offered if t != "default")
                _fail(f"unknown model_type {model_type!r} for task {task}; choose one of: {shown}")
