"""The decoded-image cache: every image of a dataset decoded once, then read from a memory map.

A GPU trains a mobile model faster than a node's CPUs decode JPEGs, so the first training on a
dataset decodes every image once, resized to the model's input size, into uint8 arrays
(N, H, W, 3) under ``<home>/cache/images/<key>/``; later trainings, sweeps and resumes on the
same data read those instead. TRAIN images are stored larger than the input by a margin, so
that the random resized crop done on the device (``device_augment``) still has the pixels it
needs; VALIDATE images are stored exactly as the evaluation transform resizes them, so that
validation reads the same tensors with or without the cache. TEST images are not cached: they
are read once, and the TEST pass measures the model's nodeQps, decoding included.

The key is the dataset fingerprint (paths, labels, splits), a digest of the files' sizes and
modification times (an image replaced in place is a new dataset), and both resolutions. A build
writes into a staging folder, chunk by chunk, and records each finished chunk in a progress file;
a killed build resumes where it stopped, and only a complete build is renamed into place, so a
cache being built is never read. One build at a time holds a lock; a training that finds the
lock taken reads its images directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.transforms import v2

from trainer.data.manifest import TRAIN, VALIDATE, Item, Manifest
from trainer.data.settings import cache_mode
from trainer.errors import UserError
from trainer.store.resources import open_lock, write_json_atomic

log = logging.getLogger("trainer")

VERSION = 1
MAX_MARGIN = 1.5  # TRAIN images are stored at most this much larger than the input
CHUNK = 128  # images decoded, written and recorded together
# The splits read at every epoch. TEST is read once, at the end, through the decoding path: the
# model's nodeQps is measured on that pass and must include decoding, as serving does.
SPLITS = (TRAIN, VALIDATE)
# A build may use at most this share of the budget left when it starts: the training it is for
# must still have most of its budget, and an unfinished build resumes in the next training.
BUILD_BUDGET_FRACTION = 0.5
DISK_HEADROOM_BYTES = 2 * 1024**3  # never fill the disk to the brim
SECONDS_PER_IMAGE_PRIOR = 0.05  # before anything is measured: a large JPEG on one core


def cache_root(home: str | Path) -> Path:
    return Path(home).expanduser() / "cache" / "images"


def train_resolution(input_size: Sequence[int], crop_scale: Sequence[float]) -> tuple[int, int]:
    """The input size grown so that the smallest crop still has about the input's pixels."""
    margin = min(MAX_MARGIN, 1 / math.sqrt(max(float(crop_scale[0]), 1e-6)))
    return (math.ceil(input_size[0] * margin), math.ceil(input_size[1] * margin))


@dataclass(frozen=True)
class Layout:
    """What a cache holds: which images, in which order, at which sizes. Its key names it."""

    fingerprint: str
    content: str  # a digest of the files' sizes and modification times
    input_size: tuple[int, int]
    train_size: tuple[int, int]
    keys: dict[str, list[str]] = field(hash=False)  # per split, the item keys in row order
    source: str = ""  # the dataset's path as the user gave it: its older caches are stale

    @classmethod
    def of(
        cls,
        manifest: Manifest,
        input_size: Sequence[int],
        crop_scale: Sequence[float],
        source: str = "",
    ) -> Layout:
        items = manifest.items
        return cls(
            fingerprint=manifest.fingerprint(),
            content=_content_digest(items),
            input_size=(int(input_size[0]), int(input_size[1])),
            train_size=train_resolution(input_size, crop_scale),
            keys={split: [i.key for i in manifest.split(split)] for split in SPLITS},
            source=source,
        )

    @property
    def key(self) -> str:
        (h, w), (th, tw) = self.input_size, self.train_size
        return f"{self.fingerprint}-{self.content[:12]}-{h}x{w}-{th}x{tw}-v{VERSION}"

    def size_of(self, split: str) -> tuple[int, int]:
        return self.train_size if split == TRAIN else self.input_size

    def nbytes(self) -> int:
        return sum(len(self.keys[s]) * self.size_of(s)[0] * self.size_of(s)[1] * 3 for s in SPLITS)

    def chunks(self) -> list[tuple[str, int, int]]:
        """(split, first row, end row) of every chunk, the same on every run of the build."""
        return [
            (split, start, min(start + CHUNK, len(self.keys[split])))
            for split in SPLITS
            for start in range(0, len(self.keys[split]), CHUNK)
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "content": self.content,
            "input_size": list(self.input_size),
            "train_size": list(self.train_size),
            "keys": self.keys,
            "source": self.source,
        }


def _content_digest(items: Sequence[Item]) -> str:
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.key):
        stat = item.path.stat()
        digest.update(f"{item.key}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# -- reading ---------------------------------------------------------------------------------


@dataclass
class CachedSplit:
    """One split's rows: where its array is, its shape, and each original image's size."""

    path: Path
    shape: tuple[int, int, int, int]  # (N, H, W, 3)
    source_hw: np.ndarray  # (N, 2) int32: each image's height and width before resizing
    row_of: dict[str, int]  # item key -> row

    def open(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape)


class ImageCache:
    """A complete cache folder, opened for reading."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.index = json.loads((directory / "index.json").read_text())

    def split(self, name: str) -> CachedSplit:
        keys = self.index["keys"][name]
        height, width = self.index["train_size" if name == TRAIN else "input_size"]
        hw = np.fromfile(self.directory / f"{name}.hw", dtype=np.int32).reshape(-1, 2)
        return CachedSplit(
            self.directory / f"{name}.u8",
            (len(keys), height, width, 3),
            hw,
            {key: row for row, key in enumerate(keys)},
        )


def open_cache(home: str | Path, layout: Layout) -> ImageCache | None:
    """The complete cache for ``layout``, or None; a half-built one is never returned."""
    directory = cache_root(home) / layout.key
    if not (directory / "index.json").is_file():
        return None
    try:
        cache = ImageCache(directory)
        # The same items (their order may differ: rows are found by key), all rows written.
        complete = all(
            sorted(cache.index["keys"][s]) == sorted(layout.keys[s])
            and (directory / f"{s}.u8").stat().st_size
            == len(layout.keys[s]) * _row_bytes(layout, s)
            for s in SPLITS
        )
    except (OSError, ValueError, KeyError):
        complete = False
    if not complete:
        log.warning("image cache %s is damaged; rebuilding it", directory)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    return cache


def _row_bytes(layout: Layout, split: str) -> int:
    height, width = layout.size_of(split)
    return height * width * 3


# -- building --------------------------------------------------------------------------------


@dataclass
class BuildResult:
    cache: ImageCache | None
    seconds: float  # spent decoding and writing in this process
    decoded: int  # images decoded in this process
    note: str  # why the cache is not there, when it is not


def build_cache(
    manifest: Manifest,
    layout: Layout,
    home: str | Path,
    time_allowance: float = math.inf,
    should_stop: Callable[[], bool] = lambda: False,
    on_chunk: Callable[[int, int], None] | None = None,
    whole_or_nothing: bool = False,
) -> BuildResult:
    """Decode what the staging folder lacks; rename it into place once complete.

    Stops early, keeping its progress for the next build, when ``should_stop`` says so or when
    the next chunk would not fit in ``time_allowance`` seconds at the rate measured so far;
    ``whole_or_nothing``: when all that is left would not fit, so that a build that cannot
    finish in this training does not spend its budget.
    """
    root = cache_root(home)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _exclusive(root / f".{layout.key}.lock") as locked:
        if not locked:
            return BuildResult(None, 0.0, 0, "another training is building it")
        found = open_cache(home, layout)  # finished by another process meanwhile
        if found is not None:
            return BuildResult(found, 0.0, 0, "")
        staging = _Staging(root / f".{layout.key}.staging", layout)
        paths = {item.key: item.path for item in manifest.items}
        limits = _Limits(started, time_allowance, whole_or_nothing, should_stop)
        decoded = _fill(staging, paths, limits, on_chunk)
        seconds = time.monotonic() - started
        if not staging.complete():
            done = staging.done_images()
            return BuildResult(None, seconds, decoded, f"{done} of {staging.total} images built")
        cache = staging.publish(root / layout.key)
    if layout.source:
        _remove_stale(root, layout)
    return BuildResult(cache, time.monotonic() - started, decoded, "")


@dataclass
class _Limits:
    started: float
    time_allowance: float
    whole_or_nothing: bool
    should_stop: Callable[[], bool]

    def allow(self, staging: _Staging, chunk_images: int, decoded: int, workers: int) -> bool:
        spent = time.monotonic() - self.started
        rate = spent / decoded if decoded else SECONDS_PER_IMAGE_PRIOR / workers
        # Whole or nothing judges the whole by the rate of a first chunk, not by the prior: a
        # prior for large JPEGs refused a 1.7 s build of small images in a 72 s budget.
        whole = self.whole_or_nothing and decoded > 0
        left = staging.total - staging.done_images() if whole else chunk_images
        return not self.should_stop() and spent + rate * left <= self.time_allowance


def _fill(
    staging: _Staging,
    paths: dict[str, Path],
    limits: _Limits,
    on_chunk: Callable[[int, int], None] | None,
) -> int:
    decoded, last_log = 0, limits.started
    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index in staging.pending():
            split, first, end = staging.chunks[index]
            if not limits.allow(staging, end - first, decoded, workers):
                break
            keys = staging.layout.keys[split][first:end]
            size = staging.layout.size_of(split)
            results = list(pool.map(lambda key, s=size: decode(paths[key], s), keys))
            staging.write(index, results)
            decoded += len(keys)
            if on_chunk is not None:
                on_chunk(staging.done_images(), staging.total)
            if time.monotonic() - last_log > 5 or staging.complete():
                last_log = time.monotonic()
                _log_progress(staging, decoded, last_log - limits.started)
    return decoded


def _log_progress(staging: _Staging, decoded: int, seconds: float) -> None:
    done, total = staging.done_images(), staging.total
    left = (total - done) * seconds / max(decoded, 1)
    log.info(
        "image cache: %d/%d images (%.0f%%) in %.1f s, about %.0f s left",
        done, total, 100 * done / max(total, 1), seconds, left,
    )  # fmt: skip


def decode(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """One image as the evaluation transform resizes it (H, W, 3 uint8), and its own size."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    pixels = v2.Resize(size, antialias=True)(v2.functional.pil_to_tensor(rgb))
    return pixels.permute(1, 2, 0).numpy(), (rgb.height, rgb.width)


class _Staging:
    """A cache being built: preallocated arrays, and a progress file of finished chunks."""

    def __init__(self, directory: Path, layout: Layout) -> None:
        self.directory, self.layout = directory, layout
        self.chunks = layout.chunks()
        self.total = sum(len(keys) for keys in layout.keys.values())
        self.progress_path = directory / "progress.json"
        self.done = self._resume()

    def _resume(self) -> set[int]:
        layout_path = self.directory / "layout.json"
        if layout_path.is_file() and self.progress_path.is_file():
            try:
                progress = json.loads(self.progress_path.read_text())
                # The same images, in chunks of the same size as when they were recorded.
                same = json.loads(layout_path.read_text()) == self.layout.to_json()
                same = same and progress["chunk"] == CHUNK
                done = set(progress["chunks"])
            except (OSError, ValueError, KeyError):
                same, done = False, set()
            if same:
                if done:
                    log.info("image cache: resuming a build, %d images already done",
                             self._images_in(done))  # fmt: skip
                return done
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)
        for split in SPLITS:  # sparse files, filled chunk by chunk
            with (self.directory / f"{split}.u8").open("wb") as handle:
                handle.truncate(len(self.layout.keys[split]) * _row_bytes(self.layout, split))
            with (self.directory / f"{split}.hw").open("wb") as handle:
                handle.truncate(len(self.layout.keys[split]) * 8)
        write_json_atomic(layout_path, self.layout.to_json())
        write_json_atomic(self.progress_path, {"chunk": CHUNK, "chunks": []})
        return set()

    def pending(self) -> list[int]:
        return [index for index in range(len(self.chunks)) if index not in self.done]

    def _images_in(self, chunks: set[int]) -> int:
        return sum(self.chunks[i][2] - self.chunks[i][1] for i in chunks)

    def done_images(self) -> int:
        return self._images_in(self.done)

    def complete(self) -> bool:
        return len(self.done) == len(self.chunks)

    def write(self, index: int, results: list[tuple[np.ndarray, tuple[int, int]]]) -> None:
        """Write one chunk's rows, make them durable, then record the chunk as done."""
        split, first, _ = self.chunks[index]
        pixels = np.stack([p for p, _ in results])
        hw = np.asarray([s for _, s in results], dtype=np.int32)
        _pwrite_durably(self.directory / f"{split}.u8", pixels, first * pixels[0].nbytes)
        _pwrite_durably(self.directory / f"{split}.hw", hw, first * 8)
        self.done.add(index)
        write_json_atomic(self.progress_path, {"chunk": CHUNK, "chunks": sorted(self.done)})

    def publish(self, target: Path) -> ImageCache:
        index = {**self.layout.to_json(), "created": time.time()}
        write_json_atomic(self.directory / "index.json", index)
        os.replace(self.directory, target)  # a folder rename: readers see all of it or none
        return ImageCache(target)


def _pwrite_durably(path: Path, array: np.ndarray, offset: int) -> None:
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(descriptor, np.ascontiguousarray(array).tobytes(), offset)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """A non-blocking lock held while building; released by the OS if the process dies."""
    handle = open_lock(lock_path)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(handle)  # releases the lock


def _remove_stale(root: Path, layout: Layout) -> None:
    """Caches of the same folder at the same sizes but of older data are never read again."""
    suffix = layout.key.split("-", 2)[2]  # the sizes and version
    for directory in root.iterdir():
        name = directory.name.lstrip(".").removesuffix(".staging")
        if name == layout.key or not name.endswith(suffix) or not directory.is_dir():
            continue
        index = directory / ("layout.json" if directory.name.startswith(".") else "index.json")
        try:
            source = json.loads(index.read_text()).get("source")
        except (OSError, ValueError):
            continue
        if source != layout.source:
            continue
        with _exclusive(root / f".{name}.lock") as locked:
            if locked:  # not being built right now
                log.info("image cache: removing %s, a cache of older data", directory.name)
                shutil.rmtree(directory, ignore_errors=True)
                (root / f".{name}.lock").unlink(missing_ok=True)


# -- deciding --------------------------------------------------------------------------------


@dataclass
class CacheOutcome:
    cache: ImageCache | None
    layout: Layout | None
    build_seconds: float  # this training's seconds building it (billed like all its work)
    note: str


def prepare_cache(
    manifest: Manifest,
    mode: Any,
    max_gb: float,
    input_size: Sequence[int],
    crop_scale: Sequence[float],
    home: str | Path,
    remaining_seconds: float,
    should_stop: Callable[[], bool] = lambda: False,
    source: str = "",
) -> CacheOutcome:
    """Open the cache, or build it when ``data.cache`` and the budget and disk allow.

    ``source``, the dataset's path, lets a new build remove the caches of its older contents.
    """
    mode = cache_mode(mode)
    try:
        max_gb = float(max_gb)
    except (TypeError, ValueError):
        raise UserError(f"data.cache_max_gb={max_gb!r} must be a number of gigabytes") from None
    if mode == "off":
        return CacheOutcome(None, None, 0.0, "data.cache=off")
    started = time.monotonic()
    try:
        return _open_or_build(
            manifest, mode, max_gb, input_size, crop_scale, home, remaining_seconds,
            should_stop, source,
        )  # fmt: skip
    # An unwritable home, a full disk, or an image that changed since the dataset check (one
    # that no longer decodes, or claims too many pixels): train without the cache.
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        log.warning("image cache: not used, %s: %s", type(error).__name__, error)
        return CacheOutcome(None, None, time.monotonic() - started, str(error))


def _open_or_build(
    manifest: Manifest,
    mode: str,
    max_gb: float,
    input_size: Sequence[int],
    crop_scale: Sequence[float],
    home: str | Path,
    remaining_seconds: float,
    should_stop: Callable[[], bool],
    source: str,
) -> CacheOutcome:
    layout = Layout.of(manifest, input_size, crop_scale, source)
    found = open_cache(home, layout)
    if found is not None:
        log.info("image cache: reading %s", found.directory)
        return CacheOutcome(found, layout, 0.0, "reused")
    refusal = _refusal(mode, layout, max_gb, home)
    if refusal:
        (log.warning if mode == "on" else log.info)("image cache: not used, %s", refusal)
        return CacheOutcome(None, layout, 0.0, refusal)
    gib = layout.nbytes() / 1024**3
    log.info("image cache: building %s (%.2f GiB)", cache_root(home) / layout.key, gib)
    allowance = BUILD_BUDGET_FRACTION * max(remaining_seconds, 0.0)
    # auto builds only what can finish now; on builds what fits, and the next training resumes.
    result = build_cache(
        manifest, layout, home, allowance, should_stop, whole_or_nothing=mode == "auto"
    )
    if result.cache is None:
        log.warning("image cache: not used by this training (%s; the next one resumes the "
                    "build)", result.note)  # fmt: skip
    return CacheOutcome(result.cache, layout, result.seconds, result.note)


def _refusal(mode: str, layout: Layout, max_gb: float, home: str | Path) -> str:
    need = layout.nbytes()
    root = cache_root(home)
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free - DISK_HEADROOM_BYTES:
        return f"it needs {need / 1e9:.1f} GB and the disk has {free / 1e9:.1f} GB free"
    if mode == "auto" and need > max_gb * 1e9:
        return (
            f"it needs {need / 1e9:.1f} GB, more than data.cache_max_gb={max_gb}; "
            "raise it or set data.cache=on"
        )
    return ""
