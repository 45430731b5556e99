"""`python -m trainer weights download`: fetch torchvision's weights for model types, once.

The only place the project downloads anything: a training never does (a download inside a
budget would bill the network's speed, and trainings run offline), it finds the weights in the
torch hub cache (trainer/tasks/pretrained.py). torch.hub writes the file to a temporary name,
checks its SHA-256 against the hash in torchvision's file name, and only then moves it into
place, so a broken or tampered download never lands in the cache.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from trainer import CONF_DIR
from trainer.errors import UserError
from trainer.settings import ModelSettings
from trainer.tasks import default_task, task_configs, task_named


def add_weights_verbs(resources: Any) -> None:
    weights = resources.add_parser("weights", help="pretrained weights in the torch hub cache")
    verbs = weights.add_subparsers(dest="verb", required=True)
    download = verbs.add_parser("download", help="fetch torchvision's weights for model types")
    task = default_task()
    download.add_argument("--task", default=task, help=f"(default {task})")
    download.add_argument(
        "--model-type", nargs="*", default=None,
        help="model types to fetch for (default: every type of the task)",
    )  # fmt: skip


def model_types(task: str) -> dict[str, dict[str, Any]]:
    """The task's model types and their ``model`` settings, from conf/task_model/<task>/."""
    folder = CONF_DIR / "task_model" / task
    types = {}
    for path in sorted(folder.glob("*.yaml")):
        model = (yaml.safe_load(path.read_text()) or {}).get("model")
        if path.stem != "default" and isinstance(model, dict):
            types[path.stem] = model
    return types


def download(args: argparse.Namespace) -> None:
    import torch.hub

    from trainer.tasks.pretrained import cached_path, problem_with, published_hash, weights_url

    tasks = task_configs()
    if args.task not in tasks:
        raise UserError(f"--task {args.task!r} is not a task; use one of {', '.join(tasks)}")
    types = model_types(args.task)
    wanted = args.model_type or list(types)
    unknown = [name for name in wanted if name not in types]
    if unknown:
        raise UserError(
            f"--model-type {', '.join(unknown)} is not a {args.task} model type; "
            f"use {', '.join(types)}"
        )
    for model_type in wanted:
        model = ModelSettings.model_validate(types[model_type])
        weights = task_named(args.task).pretrained_weights(model)
        if weights is None:
            print(f"{model_type}: torchvision has no weights for {model.constructor}")
            continue
        path = cached_path(weights)
        if path.is_file() and problem_with(path) is None:
            print(f"{model_type}: {weights} already in {path}")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        url, prefix = weights_url(weights), published_hash(path)
        print(f"{model_type}: downloading {weights} from {url}", file=sys.stderr, flush=True)
        try:
            torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=True)
        except (OSError, RuntimeError) as error:  # offline, or the hash did not match
            raise UserError(f"{model_type}: could not download {url}: {error}") from None
        print(f"{model_type}: {weights} in {path}, its SHA-256 checked")
