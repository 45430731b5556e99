"""The data group's values that the config checks read before any work; no torch here."""

from __future__ import annotations

from typing import Any

from trainer.errors import UserError

MODES = ("auto", "on", "off")


def cache_mode(value: Any) -> str:
    """``data.cache``: auto, on or off (YAML's booleans read as on and off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = str(value).lower()
    if mode not in MODES:
        raise UserError(f"data.cache={value!r} is invalid: use auto, on or off")
    return mode
