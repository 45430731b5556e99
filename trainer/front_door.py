"""What `python -m trainer --help` says: training first, then the management verbs.

The config groups and their options are read from conf/ when the help is asked for, so the
text names the ones a training composes and cannot drift from them. Nothing here imports
torch, Lightning, Hydra or MLflow: the help answers as fast as the verbs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from trainer import CONF_DIR

USAGE = """python -m trainer [key=value ...]
       python -m trainer [options] VERB ... [--help]   (VERB: one of those listed below)"""

WIDTH = 92

# The keys most trainings set, and what each means; the choices of the groups among them are
# added from conf/.
KEYS = (
    ("task=NAME", "what to train for: {task}"),
    (
        "model_type=NAME",
        "the network and its trade-off, per task (conf/task_model/<task>/); "
        "default: the task's own ({default_type})",
    ),
    (
        "dataset.path=PATH",
        "a folder with one sub-folder per label, or an AutoML CSV "
        "[ML_USE,]path,label; empty (the default): the bundled demo dataset",
    ),
    (
        "dataset_id=ID",
        "a dataset on record instead of a path: its imported rows (python -m trainer datasets "
        "--help)",
    ),
    (
        "budget.train_budget_milli_node_hours=N",
        "the budget, never exceeded (1 milli-node-hour = 3.6 node-seconds); bounds and default "
        "per model type",
    ),
    ("display_name=NAME", "the model's name: up to 32 letters, digits and _"),
)

EXAMPLES = (
    ("python -m trainer", "train on the bundled demo dataset"),
    (
        "python -m trainer dataset.path=data/flowers model_type=mobile-versatile-1 \\\n"
        "      budget.train_budget_milli_node_hours=2000 display_name=flowers_v1",
        "your images, a model type and a budget",
    ),
    ("python -m trainer -m optimizer.lr=1e-3,3e-3", "one training per value (Hydra's multirun)"),
    (
        "python -m trainer -m hydra/sweeper=budgeted ...",
        "a sweep under one total budget (README.md, 'Sweeps under one budget')",
    ),
)


def description(conf: Path = CONF_DIR) -> str:
    """Training: what it is, how to start one, and the keys most runs set."""
    defaults = _defaults(conf)
    tasks = _options(conf / "task")
    task = defaults.get("task", "")
    fills = {
        "task": ", ".join(f"{name} (default)" if name == task else name for name in tasks),
        "default_type": ", ".join(
            f"{name}: {_default_type(conf, name)}" for name in tasks if _default_type(conf, name)
        ),
    }
    lines = _wrap(
        "Train torchvision models under a budget in milli-node-hours, with MLflow as the system "
        "of record. Training is the main job: every key=value argument is a Hydra override of "
        f"{conf.name}/config.yaml."
    )
    lines.append("")
    lines += [f"  {command}" + (f"\n      {note}" if note else "") for command, note in EXAMPLES]
    lines += ["", "keys most runs set:"]
    for key, meaning in KEYS:
        lines.append(f"  {key}")
        lines += _wrap(meaning.format(**fills), indent=6)
    lines.append("")
    lines += _wrap(
        "Besides training, the management verbs below read and change what is on record "
        "(models, operations) and predict; each has its own --help."
    )
    return "\n".join(lines)


def epilog(conf: Path = CONF_DIR) -> str:
    """The config groups found in conf/, Hydra's flags, and where each verb says more."""
    defaults = _defaults(conf)
    lines = _wrap(
        f"config groups ({conf.name}/<group>/*.yaml; choose an option with group=option, set "
        "one key with group.key=value):"
    )
    found = groups(conf)
    column = 4 + max((len(group) for group, _ in found), default=0)
    for group, options in found:
        default = defaults.get(group)
        named = [
            f"{name} (default)" if name == default and len(options) > 1 else name
            for name in options
        ]
        lines += _wrap(", ".join(named), indent=column, first=f"  {group}")
    lines += [
        "",
        "before training:",
        "  python -m trainer [key=value ...] --cfg job",
        "      print the whole config a training would run with, and stop (Hydra's --cfg job)",
        "  python -m trainer key=value ... --help",
        "      Hydra's help for that composition: its groups and the whole config",
        "  python -m trainer --hydra-help",
        "      Hydra's own flags (--multirun, --cfg, --info ...)",
        "",
        "each verb has its own --help:",
        "  python -m trainer models --help       python -m trainer models list --help",
        "  python -m trainer predict --help      python -m trainer operations --help",
        "  python -m trainer weights --help      python -m trainer sweeps --help",
        "  python -m trainer datasets --help     python -m trainer serve --help",
        "",
        "More: README.md (training, budgets, the verbs) and conf/README.md (the groups).",
    ]
    return "\n".join(lines)


def groups(conf: Path = CONF_DIR) -> list[tuple[str, list[str]]]:
    """Every config group under conf/ (``hydra/sweeper`` and ``task_model/<task>`` included)
    with its options, the names of its YAML files."""
    found = []
    for folder in sorted(p for p in conf.rglob("*") if p.is_dir()):
        options = _options(folder)
        if options:
            found.append((folder.relative_to(conf).as_posix(), options))
    return found


def _options(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.yaml"))


def _defaults(conf: Path) -> dict[str, str]:
    """config.yaml's defaults list: each group's default option."""
    entries = yaml.safe_load((conf / "config.yaml").read_text()).get("defaults", [])
    return {k: str(v) for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


def _default_type(conf: Path, task: str) -> str:
    """The model type a task's ``default`` option includes (task_model/<task>/default.yaml)."""
    path = conf / "task_model" / task / "default.yaml"
    if not path.is_file():
        return ""
    entries = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
    for entry in entries:
        if isinstance(entry, str):  # /task_model/<task>/<type>@_here_
            return entry.split("@", 1)[0].rsplit("/", 1)[-1]
    return ""


def _wrap(text: str, indent: int = 0, first: str = "") -> list[str]:
    """``text`` wrapped to WIDTH; after ``first`` on its line when that leaves room."""
    pad = " " * indent
    if first and len(first) < indent - 1:
        first, head = first.ljust(indent), []
    else:
        first, head = pad, [first] if first else []
    wrapped = textwrap.wrap(
        text, WIDTH, initial_indent=first, subsequent_indent=pad, break_on_hyphens=False
    )
    return head + (wrapped or [first.rstrip()])
