"""What every export shares, importing no torch: conf/export.yaml's formats (the CLI and the API
server refuse one that is not offered before anything heavy loads) and the latency measurement."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from trainer import CONF_DIR
from trainer.errors import UserError


@functools.cache
def export_formats() -> dict[str, Any]:
    """conf/export.yaml: the formats offered (name: model file) and AutoML's refused ones
    (name: why)."""
    import yaml

    return dict(yaml.safe_load((CONF_DIR / "export.yaml").read_text()))


def check_format(fmt: str) -> None:
    """One line for a format that is not offered: AutoML's refused ones say why."""
    offered = ", ".join(export_formats()["formats"])
    refused = export_formats()["refused"]
    if fmt in refused:
        raise UserError(f"modelFormat {fmt!r} is not offered here: {refused[fmt]}; the formats "
                        f"offered are {offered}")  # fmt: skip
    if fmt not in export_formats()["formats"]:
        raise UserError(f"modelFormat {fmt!r} is not a format; the formats offered are {offered}")


LATENCY_RUNS, WARMUP_RUNS = 50, 10
QUANTIZATIONS = ("none", "int8")  # --quantize; int8 for the tflite format only


def latency_ms(run: Callable[[Any], Any], example: Any) -> float:
    """Median milliseconds of ``run(example)`` after warm-up."""
    for _ in range(WARMUP_RUNS):
        run(example)
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        run(example)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
