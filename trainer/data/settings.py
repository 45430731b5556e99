"""The data group's values that the config checks read before any work; no torch here."""

from __future__ import annotations

import math
from typing import Any

from trainer.errors import UserError

MODES = ("auto", "on", "off")


def _mode(key: str, value: Any) -> str:
    """auto, on or off (YAML's booleans read as on and off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value).lower()
    if mode not in MODES:
        raise UserError(f"{key}={value!r} is invalid: use auto, on or off")
    return mode


def cache_mode(value: Any) -> str:
    """``data.cache``: auto, on or off."""
    return _mode("data.cache", value)


def cache_on_device_mode(value: Any) -> str:
    """``data.cache_on_device``: auto, on or off."""
    return _mode("data.cache_on_device", value)


def cache_on_device_share(value: Any) -> float:
    """``data.cache_on_device_share``: the share of the device's memory a cache may take."""
    try:
        share = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        share = math.nan
    if not 0 < share <= 1:  # NaN fails too
        raise UserError(
            f"data.cache_on_device_share={value!r} is invalid: use a fraction of the device's "
            "memory above 0 and at most 1, e.g. 0.25"
        )
    return share
