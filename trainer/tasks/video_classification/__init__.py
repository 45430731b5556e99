"""Video classification: AutoML Video's CSV of labelled segments; clips from each segment.

This module stays light (no torch): the CLI reads the predict verb's video flags from it.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_predict_options(parser: Any) -> None:
    group = parser.add_argument_group(
        "video models (input CSV: path,start_seconds,end_seconds; output video_classification.csv)"
    )
    group.add_argument(
        "--segment-classification", action=argparse.BooleanOptionalAction, default=True,
        help="classify each input segment as a whole (default: on)",
    )  # fmt: skip
    group.add_argument("--shot-classification", action="store_true", help="classify each shot")
    group.add_argument(
        "--1s-interval-classification", dest="one_second_interval_classification",
        action="store_true", help="classify each 1-second window",
    )  # fmt: skip
