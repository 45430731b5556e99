"""``model.input_size=auto``: the resolution a dataset needs, not the largest a network takes.

A network's cost per image grows with its pixels: 1,797 digits of 32x32 upscaled to 128x128 took
16 times the work of their own size and reached a lower accuracy within 72 s (issue 17). Under
``auto`` the size is the dataset's median image size rounded up to the network's stride
multiple, between the type's ``smallest_input_size`` (what the network needs) and
``largest_input_size`` (what the type is meant for). The median comes from the headers of an
even sample of the TRAIN images: no image is decoded.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from PIL import Image

SAMPLE = 256  # headers read at most: a few milliseconds
T = TypeVar("T")


def even_sample(items: Sequence[T], count: int = SAMPLE) -> list[T]:
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file's header, or None for a file that has none."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            return height, width
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def median_size(
    paths: Iterable[Path], size_of: Callable[[Path], tuple[int, int] | None] = image_size
) -> tuple[int, int] | None:
    sizes = [size for size in map(size_of, paths) if size is not None]
    if not sizes:
        return None
    return (
        int(statistics.median(h for h, _ in sizes)),
        int(statistics.median(w for _, w in sizes)),
    )


class SizeBounds(Protocol):
    """What a model type allows (ModelSettings has it): auto's ceiling and floor."""

    @property
    def largest_input_size(self) -> tuple[int, int]: ...

    @property
    def smallest_input_size(self) -> tuple[int, int]: ...


def auto_input_size(
    median: tuple[int, int] | None, model: SizeBounds, stride: int
) -> tuple[int, int]:
    """The median rounded up to ``stride``, within the type's smallest and largest sizes (the
    largest when the median is unknown)."""
    largest, smallest = model.largest_input_size, model.smallest_input_size
    if median is None:
        return largest
    return tuple(  # type: ignore[return-value]
        min(top, max(bottom, math.ceil(m / stride) * stride))
        for m, bottom, top in zip(median, smallest, largest, strict=True)
    )
