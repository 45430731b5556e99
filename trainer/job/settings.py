"""Checking the composed config before any work, so a user's mistake costs nothing."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from budgets import BudgetOutOfBounds, check_budget
from trainer import CONF_DIR
from trainer.data.input_size import checked_size, is_auto
from trainer.data.settings import cache_mode, cache_on_device_mode, cache_on_device_share
from trainer.errors import UserError
from trainer.store.automl import Parent
from trainer.store.resources import check_name
from trainer.tasks import default_task, pretrained_mode

GROUPS_CHECKED = ("task", "model_type")


@dataclass(frozen=True)
class TrainSettings:
    budget: int
    nodes: int
    display_name: str
    dataset_path: str | None


def validate(cfg: dict[str, Any]) -> TrainSettings:
    try:
        budget = check_budget(
            cfg["budget"]["train_budget_milli_node_hours"],
            cfg["budget"]["min_milli_node_hours"],
            cfg["budget"]["max_milli_node_hours"],
        )
    except BudgetOutOfBounds as error:
        raise UserError(str(error)) from None
    display_name = check_name("display_name", str(cfg["display_name"]))
    nodes = cfg["trainer"]["num_nodes"]
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UserError(f"trainer.num_nodes={nodes!r} must be a whole number >= 1")
    seed = cfg["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"seed={seed!r} must be an integer")
    dataset_path = cfg["dataset"]["path"]
    if dataset_path is not None and not Path(str(dataset_path)).expanduser().exists():
        raise UserError(
            f"dataset.path={dataset_path!r} does not exist; give a folder with one sub-folder "
            "per label or an AutoML CSV, or leave it out to use the bundled demo dataset"
        )
    cache_mode(cfg["data"].get("cache", "off"))  # a typo is refused before any work
    cache_on_device_mode(cfg["data"].get("cache_on_device", "off"))
    cache_on_device_share(cfg["data"].get("cache_on_device_share", 1))
    model = cfg["model"]
    if not is_auto(model.get("input_size", "auto")):
        checked_size(model["input_size"], "model.input_size")
    pretrained_mode(model.get("pretrained", "false"))
    lr_schedule(cfg["optimizer"])
    Parent.of_config(cfg)  # resource names: the project and location must fit in one
    reserve = cfg["budget"].get("save_reserve_seconds", 0)
    if str(reserve) != "auto" and not _non_negative_number(reserve):
        raise UserError(
            f"budget.save_reserve_seconds={reserve!r} is invalid: use auto or a number of seconds"
        )
    return TrainSettings(budget, nodes, display_name, dataset_path)


def lr_schedule(optimizer: dict[str, Any]) -> tuple[bool, float]:
    """Whether the rate follows the budget (``optimizer.lr_schedule``: budget_linear, or
    constant), and the final rate factor, which an annealing before convergence also reaches
    (budgets/schedule.py)."""
    schedule = optimizer.get("lr_schedule", "constant")
    if schedule not in ("budget_linear", "constant"):
        raise UserError(f"optimizer.lr_schedule={schedule!r}: use budget_linear or constant")
    final = optimizer.get("final_lr_factor", 0.02)
    if not _non_negative_number(final) or not 0 < float(final) <= 1:
        raise UserError(f"optimizer.final_lr_factor={final!r} must lie in (0, 1]")
    return schedule == "budget_linear", float(final)


def _non_negative_number(value: Any) -> bool:
    try:
        return not isinstance(value, bool) and float(value) >= 0
    except (TypeError, ValueError):
        return False


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


def current_home() -> str:
    """The home this process works in: config.yaml's ``home``, resolved as a training would."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(CONF_DIR / "config.yaml")["home"])


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
