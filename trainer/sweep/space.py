"""The search space, written in Hydra's override grammar as Hydra users already write it.

``key=choice(a,b)``, ``key=range(1,5)``, ``key=interval(1e-4,1e-1)``, ``key=tag(log,interval(...))``
(``tag(int, interval(...))`` for whole numbers) become Optuna distributions; ``key=value`` and
``key=a,b`` fixed or listed values stay as they are or become a choice. Every key is checked
against the composed config before any work: a typo or an interval on a non-numeric key is one
line and exit 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from trainer.errors import UserError

# What the sweep sets for each trial itself; and what a trial cannot be.
SET_BY_SWEEP = ("budget.train_budget_milli_node_hours", "display_name")
NOT_IN_A_SWEEP = ("resume_operation", "detach")
PLAIN = re.compile(r"[A-Za-z0-9_./:+-]+")  # needs no quotes in an override


@dataclass
class SearchSpace:
    """Optuna's distributions by override key, and the overrides every trial shares."""

    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """A trial's command-line overrides: the shared ones, then its own values."""
        return [*self.fixed, *(f"{key}={override_literal(value)}" for key, value in params.items())]

    def grid(self) -> dict[str, list[Any]]:
        """For the grid sampler: every parameter's values (choices only)."""
        from optuna.distributions import CategoricalDistribution

        grid = {}
        for key, distribution in self.distributions.items():
            if not isinstance(distribution, CategoricalDistribution):
                raise UserError(f"sweep.sampler=grid takes choice() and range() only; {key} is "
                                "an interval: use sweep.sampler=tpe or random")  # fmt: skip
            grid[key] = list(distribution.choices)
        return grid


def parse_space(arguments: list[str], cfg: DictConfig, groups: dict[str, Any]) -> SearchSpace:
    """The search space of a sweep's overrides, checked against the composed config ``cfg``
    and its config groups (``groups``: Hydra's runtime choices)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
    except HydraException as error:
        raise UserError(f"the sweep's overrides do not parse: {error}") from None
    space = SearchSpace()
    for override in parsed:
        key = override.key_or_group
        own = key.startswith(("sweep.", "hydra.")) or key in ("sweep", "hydra", *SET_BY_SWEEP)
        if own and override.is_sweep_override():
            raise UserError(f"{key} is set by the sweep, not searched: give it one value")
        if own:
            continue  # the sweep's settings, or a value it gives each trial itself
        if key in NOT_IN_A_SWEEP:
            raise UserError(f"{key} has no place in a sweep: its trials are new trainings")
        current = _current_value(key, cfg, groups)
        if not override.is_sweep_override():
            assert override.input_line is not None  # the parser keeps each override's text
            space.fixed.append(override.input_line)
            continue
        sweep = override.value()
        if isinstance(sweep, IntervalSweep):
            space.distributions[key] = _interval(key, sweep, current)
        elif isinstance(sweep, (ChoiceSweep, RangeSweep)):
            space.distributions[key] = _choice(list(override.sweep_iterator()))
        else:  # a glob of config choices
            raise UserError(f"{key}: use choice(...) to search config groups")
    if not space.distributions:
        example = "'optimizer.lr=tag(log,interval(1e-4,1e-1))' or data.batch_size=choice(32,64)"
        raise UserError(f"a sweep needs at least one parameter to search, e.g. {example}")
    return space


def _current_value(key: str, cfg: DictConfig, groups: dict[str, Any]) -> Any:
    if key in groups:
        return groups[key]
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing, throw_on_resolution_failure=False)
    if value is missing:
        raise UserError(f"{key} is not a key of the training's config: check its spelling "
                        "(python -m trainer --cfg job lists them)")  # fmt: skip
    return value


def _interval(key: str, sweep: Any, current: Any) -> Any:
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise UserError(f"{key}=interval(...) needs a numeric key; {key} is {current!r}: "
                        "use choice(...)")  # fmt: skip
    log = "log" in sweep.tags
    whole = float(sweep.start).is_integer() and float(sweep.end).is_integer()
    if "int" in sweep.tags or (isinstance(current, int) and whole):
        return IntDistribution(int(sweep.start), int(sweep.end), log=log)
    return FloatDistribution(float(sweep.start), float(sweep.end), log=log)


def _choice(values: list[Any]) -> Any:
    from optuna.distributions import CategoricalDistribution

    return CategoricalDistribution([_plain(v) for v in values])


def _plain(value: Any) -> Any:
    """What Optuna stores: None, bool, int, float or str (a list is kept as its override)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def override_literal(value: Any) -> str:
    """``value`` as Hydra's override grammar reads it back: a string other than a plain word
    is quoted, so that a space, a comma or a ``${...}`` in a choice stays part of the value."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, str) and (not PLAIN.fullmatch(value) or _reads_as_other(value)):
        escaped = re.sub(r"(\\*)'", r"\1\1\\'", value)  # a quote, and backslashes before it
        return "'" + re.sub(r"(\\+)$", r"\1\1", escaped) + "'"  # and before the closing one
    return str(value)


def _reads_as_other(text: str) -> bool:
    """Whether Hydra would read the bare word as a number, a bool or null, not as text."""
    try:
        float(text)
    except ValueError:
        return text.lower() in ("true", "false", "null")
    return True
