"""The bundled default object-detection dataset: shapes on noisy backgrounds, generated
deterministically and written as PNGs plus an AutoML detection CSV.

Each image holds one to three non-overlapping shapes (circle, square, triangle) of varied size
and colour; about one image in seven holds none (a negative example). Splits are written in
the CSV (80/10/10 by image index) so that even a small dataset has boxes in every split.
Generated on first use rather than shipped; the same seed always draws the same dataset.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.data.demo import generate_once

LABELS = ("circle", "square", "triangle")
VERSION = "detection_shapes_v1"
CSV_NAME = "dataset.csv"
Pixels = tuple[float, float, float, float]


def ensure_demo_detection_dataset(home: str | Path, images: int = 300, size: int = 128) -> Path:
    """Return the demo detection CSV under ``home``, generating the dataset once if absent."""
    target = Path(home).expanduser() / "datasets" / f"{VERSION}_{images}x{size}"
    generate_once(
        target, target / CSV_NAME, lambda folder: write_detection_shapes(folder, images, size, 0)
    )
    return target / CSV_NAME


def write_detection_shapes(folder: Path, images: int, size: int, seed: int) -> Path:
    """Write ``images`` PNGs under ``folder/images`` and their CSV; return the CSV's path."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    for index in range(images):
        ml_use = split_by_index(index)
        name = f"images/shapes_{index:04d}.png"
        count = 0 if index % 7 == 3 else int(rng.integers(1, 4))
        image, objects = draw_scene(size, count, rng)
        image.save(folder / name)
        rows += image_rows(ml_use, name, objects, size)
    csv_path = folder / CSV_NAME
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return csv_path


def split_by_index(index: int) -> str:
    return {8: "VALIDATE", 9: "TEST"}.get(index % 10, "TRAIN")


def image_rows(
    ml_use: str, name: str, objects: list[tuple[str, Pixels]], size: int
) -> list[list[str]]:
    """AutoML's detection CSV rows of one image: one per box (two vertices, as fractions of
    ``size``), or the path alone for an image without objects."""
    if not objects:
        return [[ml_use, name]]
    rows = []
    for label, (x0, y0, x1, y1) in objects:
        corners = [f"{v / size:.6f}" for v in (x0, y0, x1, y1)]
        rows.append([ml_use, name, label, *corners[:2], "", "", *corners[2:], "", ""])
    return rows


def draw_scene(
    size: int, count: int, rng: np.random.Generator
) -> tuple[Image.Image, list[tuple[str, Pixels]]]:
    background = tuple(int(v) for v in rng.integers(0, 110, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    objects: list[tuple[str, Pixels]] = []
    for _ in range(count):
        box = _free_box(size, [b for _, b in objects], rng)
        if box is None:
            break
        label = LABELS[int(rng.integers(len(LABELS)))]
        colour = tuple(int(v) for v in rng.integers(140, 256, 3))
        _draw_shape(draw, label, box, colour)
        objects.append((label, box))
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-25, 26, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), objects


def _free_box(size: int, taken: list[Pixels], rng: np.random.Generator) -> Pixels | None:
    """A square box (edge 16 to 40% of the image) clear of the others, or None."""
    for _ in range(30):
        half = rng.uniform(0.08, 0.2) * size
        cx, cy = rng.uniform(half, size - half, 2)
        box = (cx - half, cy - half, cx + half, cy + half)
        if all(_apart(box, other) for other in taken):
            return box
    return None


def _apart(a: Pixels, b: Pixels, gap: float = 2.0) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _draw_shape(draw: ImageDraw.ImageDraw, label: str, box: Pixels, colour: tuple) -> None:
    x0, y0, x1, y1 = box
    if label == "circle":
        draw.ellipse(box, fill=colour)
    elif label == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
