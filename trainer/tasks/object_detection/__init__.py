"""Object detection: AutoML's detection CSV (boxes in [0, 1]); torchvision's detectors.

This module stays light (no torch): the CLI reads the predict verb's detection flags from it.
"""

from __future__ import annotations

from typing import Any

DEFAULT_MAX_BOUNDING_BOX_COUNT = 100


def add_predict_options(parser: Any) -> None:
    group = parser.add_argument_group("object detection models")
    group.add_argument(
        "--max-bounding-box-count", type=int, default=DEFAULT_MAX_BOUNDING_BOX_COUNT,
        help="at most this many boxes an image, best first",
    )  # fmt: skip
