"""The bundled default dataset: simple shapes and patterns, generated deterministically.

Generated on first use rather than shipped, so the repository stays small; the same seed always
draws the same images, so the dataset fingerprint is stable across machines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.data.demo import generate_once

LABELS = ("circle", "square", "triangle", "cross", "stripes_h", "stripes_v")
SOLID = LABELS[:4]  # the shapes that several can share an image (stripes fill it)
VERSION = "shapes_v1"


def ensure_demo_dataset(home: str | Path, per_label: int = 80, size: int = 64) -> Path:
    """Return the demo dataset's folder under ``home``, generating it once if absent."""
    target = Path(home).expanduser() / "datasets" / f"{VERSION}_{per_label}x{size}"
    generate_once(target, target, lambda folder: write_shapes(folder, per_label, size, seed=0))
    return target


def write_shapes(folder: Path, per_label: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for label in LABELS:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for index in range(per_label):
            draw_shape(label, size, rng).save(folder / label / f"{label}_{index:04d}.png")


def draw_shape(label: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 110, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    half = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(half, size - half, 2)
    if label in SOLID:
        draw_solid(draw, label, (cx, cy), half, colour)
    else:
        period = int(rng.integers(6, 12))
        for offset in range(int(rng.integers(0, period)), size, period):
            if label == "stripes_h":
                draw.rectangle((0, offset, size, offset + period // 2 - 1), fill=colour)
            else:
                draw.rectangle((offset, 0, offset + period // 2 - 1, size), fill=colour)
    return noisy(image, rng)


def noisy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    size = image.size[0]
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def draw_solid(
    draw: ImageDraw.ImageDraw, label: str, centre: tuple[float, float], half: float,
    colour: tuple[int, ...],
) -> None:  # fmt: skip
    """One of the SOLID shapes, ``half`` its half-width."""
    cx, cy = centre
    box = (cx - half, cy - half, cx + half, cy + half)
    if label == "circle":
        draw.ellipse(box, fill=colour)
    elif label == "square":
        draw.rectangle(box, fill=colour)
    elif label == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:  # cross
        width = half / 3
        draw.rectangle((cx - half, cy - width, cx + half, cy + width), fill=colour)
        draw.rectangle((cx - width, cy - half, cx + width, cy + half), fill=colour)


def write_multilabel_shapes(folder: Path, images: int, size: int, seed: int) -> Path:
    """A MULTILABEL dataset: each image holds one to three of the SOLID shapes, each in its own
    quarter of the image; the CSV ``multilabel.csv`` names each image's shapes (UNASSIGNED
    rows: the 80/10/10 split)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(images):
        count = int(rng.integers(1, 4))
        shapes = sorted(rng.choice(len(SOLID), count, replace=False))
        quarters = rng.choice(4, count, replace=False)
        background = tuple(int(v) for v in rng.integers(0, 110, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for shape, quarter in zip(shapes, quarters, strict=True):
            half = rng.uniform(0.14, 0.22) * size
            offset = rng.uniform(-0.04, 0.04, 2) * size
            centre = ((quarter % 2 + 0.5) * size / 2 + offset[0],
                      (quarter // 2 + 0.5) * size / 2 + offset[1])  # fmt: skip
            colour = tuple(int(v) for v in rng.integers(140, 256, 3))
            draw_solid(draw, SOLID[shape], centre, half, colour)
        name = f"images/{index:05d}.png"
        noisy(image, rng).save(folder / name)
        rows.append(",".join([name, *(SOLID[shape] for shape in shapes)]))
    csv = folder / "multilabel.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def write_digits(folder: Path) -> None:
    """Real images the project did not draw: scikit-learn's 1,797 scanned 8x8 handwritten digits
    (shipped inside the package, no download), a folder per digit (tests and benchmarks)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        label_dir = folder / f"digit_{target}"
        label_dir.mkdir(parents=True, exist_ok=True)
        grey = (pixels * (255 / 16)).astype(np.uint8)
        Image.fromarray(grey).convert("RGB").save(label_dir / f"{index:04d}.png")
