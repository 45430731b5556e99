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
    box = (cx - half, cy - half, cx + half, cy + half)
    if label == "circle":
        draw.ellipse(box, fill=colour)
    elif label == "square":
        draw.rectangle(box, fill=colour)
    elif label == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    elif label == "cross":
        width = half / 3
        draw.rectangle((cx - half, cy - width, cx + half, cy + width), fill=colour)
        draw.rectangle((cx - width, cy - half, cx + width, cy + half), fill=colour)
    else:
        period = int(rng.integers(6, 12))
        for offset in range(int(rng.integers(0, period)), size, period):
            if label == "stripes_h":
                draw.rectangle((0, offset, size, offset + period // 2 - 1), fill=colour)
            else:
                draw.rectangle((offset, 0, offset + period // 2 - 1, size), fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


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
