"""A detection dataset made from real photographs found on this machine, not from drawn shapes.

The photos ship inside installed packages (no download): scikit-learn's sample images (a dahlia,
the Summer Palace in Beijing) and matplotlib's portrait of Grace Hopper. Objects are cut from
them (flower, pagoda, face, flag) and pasted, at random scales and positions, with random flips,
crops and colour changes, onto canvases cut from the same photos' object-free regions (sky,
lake, trees, bokeh, uniform); their boxes are recorded in an AutoML detection CSV. About one
image in eight holds no object (a negative example).

    .venv/bin/python benchmarks/real_detection_dataset.py OUT_DIR [--images 300] [--size 160]

prints the CSV's path and the dataset's figures; train on it with
``dataset.path=OUT_DIR/dataset.csv``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from trainer.tasks.object_detection.demo import CSV_NAME, image_rows, split_by_index

Region = tuple[int, int, int, int]  # left, top, right, bottom, in the photo's pixels


@dataclass(frozen=True)
class Photo:
    """A photo file, the objects to cut from it, and its regions free of any object."""

    file: str
    objects: dict[str, Region]
    backgrounds: tuple[Region, ...]


# Regions picked by eye on a 50-pixel grid drawn over each photo.
PHOTOS = {
    "china.jpg": Photo(
        "sklearn:china.jpg",
        {"pagoda": (58, 22, 358, 400)},
        ((365, 0, 640, 300), (360, 290, 640, 427)),  # sky and lake; trees
    ),
    "flower.jpg": Photo(
        "sklearn:flower.jpg",
        {"flower": (165, 80, 450, 362)},
        ((0, 0, 160, 427), (455, 0, 640, 360)),  # blurred leaves on both sides
    ),
    "grace_hopper.jpg": Photo(
        "matplotlib:grace_hopper.jpg",
        {"face": (150, 20, 372, 332), "flag": (0, 0, 140, 330)},
        ((380, 0, 512, 330), (0, 400, 512, 600)),  # blue backdrop; uniform
    ),
}


def find_photo(spec: str) -> Path | None:
    """``package:file`` to the file inside that installed package, without importing it."""
    package, name = spec.split(":")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(next(iter(found.submodule_search_locations)))
    sub = {"sklearn": "datasets/images", "matplotlib": "mpl-data/sample_data"}[package]
    path = root / sub / name
    return path if path.is_file() else None


def load_sources() -> tuple[dict[str, Image.Image], list[Image.Image]]:
    """Object crops by label, and background crops, from every photo that is installed."""
    objects: dict[str, Image.Image] = {}
    backgrounds: list[Image.Image] = []
    for photo in PHOTOS.values():
        path = find_photo(photo.file)
        if path is None:
            continue
        with Image.open(path) as file:
            image = file.convert("RGB")
        objects.update({label: image.crop(box) for label, box in photo.objects.items()})
        backgrounds += [image.crop(box) for box in photo.backgrounds]
    if len(objects) < 2 or not backgrounds:
        raise SystemExit("fewer than two source photos found (scikit-learn, matplotlib)")
    return objects, backgrounds


def build_real_detection_dataset(
    folder: str | Path, images: int = 300, size: int = 160, seed: int = 0
) -> Path:
    """Write ``images`` canvases of ``size`` pixels under ``folder/images`` and the CSV."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    objects, backgrounds = load_sources()
    labels = sorted(objects)
    rng = np.random.default_rng(seed)
    rows: list[list[str]] = []
    for index in range(images):
        ml_use = split_by_index(index)
        name = f"images/real_{index:04d}.jpg"
        count = 0 if index % 8 == 5 else int(rng.integers(1, 4))
        canvas = background_canvas(backgrounds, size, rng)
        boxes = paste_objects(canvas, objects, labels, count, rng)
        canvas.save(folder / name, quality=92)
        rows += image_rows(ml_use, name, boxes, size)
    csv_path = folder / CSV_NAME
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return csv_path


def background_canvas(
    backgrounds: list[Image.Image], size: int, rng: np.random.Generator
) -> Image.Image:
    """A random window (half to all of a region's shorter side) of a background, resized."""
    source = backgrounds[int(rng.integers(len(backgrounds)))]
    side = int(min(source.size) * rng.uniform(0.5, 1.0))
    left = int(rng.integers(0, source.width - side + 1))
    top = int(rng.integers(0, source.height - side + 1))
    canvas = source.crop((left, top, left + side, top + side)).resize((size, size))
    return canvas.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else canvas


def paste_objects(
    canvas: Image.Image,
    objects: dict[str, Image.Image],
    labels: list[str],
    count: int,
    rng: np.random.Generator,
) -> list[tuple[str, Region]]:
    placed: list[tuple[str, Region]] = []
    for _ in range(count):
        label = labels[int(rng.integers(len(labels)))]
        piece = vary(objects[label], canvas.width, rng)
        box = free_spot(piece.size, canvas.size, [b for _, b in placed], rng)
        if box is None:
            continue
        canvas.paste(piece, box[:2])
        placed.append((label, box))
    return placed


def vary(crop: Image.Image, canvas_size: int, rng: np.random.Generator) -> Image.Image:
    """The object cut a little differently, flipped, scaled and re-lit: a new instance."""
    width, height = crop.size
    keep_w, keep_h = rng.uniform(0.85, 1.0, 2)
    left = int(rng.uniform(0, 1 - keep_w) * width)
    top = int(rng.uniform(0, 1 - keep_h) * height)
    piece = crop.crop((left, top, left + int(keep_w * width), top + int(keep_h * height)))
    if rng.random() < 0.5:
        piece = piece.transpose(Image.FLIP_LEFT_RIGHT)
    longest = rng.uniform(0.22, 0.5) * canvas_size
    scale = longest / max(piece.size)
    aspect = rng.uniform(0.85, 1.15)
    piece = piece.resize(
        (max(4, int(piece.width * scale * aspect)), max(4, int(piece.height * scale / aspect)))
    )
    piece = ImageEnhance.Brightness(piece).enhance(rng.uniform(0.7, 1.3))
    piece = ImageEnhance.Contrast(piece).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(piece).enhance(rng.uniform(0.6, 1.4))


def free_spot(
    piece: tuple[int, int], canvas: tuple[int, int], taken: list[Region], rng: np.random.Generator
) -> Region | None:
    """A place for the piece that overlaps no placed object, or None after 30 tries."""
    width, height = piece
    for _ in range(30):
        left = int(rng.integers(0, canvas[0] - width + 1))
        top = int(rng.integers(0, canvas[1] - height + 1))
        box = (left, top, left + width, top + height)
        if all(_apart(box, other) for other in taken):
            return box
    return None


def _apart(a: Region, b: Region) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def summary(csv_path: Path) -> str:
    with csv_path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    per_label = Counter(row[2] for row in rows if len(row) > 2)
    images = len({row[1] for row in rows})
    negatives = sum(1 for row in rows if len(row) == 2)
    boxes = ", ".join(f"{label} {n}" for label, n in sorted(per_label.items()))
    return f"{images} images ({negatives} without objects), boxes: {boxes}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=160, help="canvas edge in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    csv_path = build_real_detection_dataset(args.folder, args.images, args.size, args.seed)
    print(csv_path)
    print(summary(csv_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
