"""The data group's values that the config checks read before any work; no torch here."""

from __future__ import annotations

from typing import Any

from trainer.settings import mode, share


def cache_mode(value: Any) -> str:
    """``data.cache``: auto, on or off."""
    return mode("data.cache", value)


def cache_on_device_mode(value: Any) -> str:
    """``data.cache_on_device``: auto, on or off."""
    return mode("data.cache_on_device", value)


def cache_on_device_share(value: Any) -> float:
    """``data.cache_on_device_share``: the share of the device's memory a cache may take."""
    return share("data.cache_on_device_share", value)
