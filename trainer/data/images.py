"""Turning manifest items into tensors: the training augmentation and the evaluation transform.

Evaluation and prediction resize the whole image to the model's input size (no crop), scale to
[0, 1] and normalize; exported models document the same rule.

With the decoded-image cache (``image_cache``), the TRAIN and VALIDATE loaders read its arrays
instead, without a DataLoader (``cache_batches``): held on the device when
``data.cache_on_device`` says so (``CachePlacement``), else read ahead from the memory map by
threads. TRAIN batches stay uint8 and are cropped, flipped and normalized on the device
(``device_augment``); VALIDATE batches are normalized into the very tensors the evaluation
transform makes. TEST images are decoded as always (see ``image_cache.SPLITS``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from trainer.data.cache_batches import (
    CachedBatches,
    DeviceBatches,
    HostBatches,
    fits_on_device,
    held_bytes,
)
from trainer.data.device_augment import (
    DeviceAugment,
    DevicePlan,
    evaluation_pixels,
    resolve_channels_last,
)
from trainer.data.image_cache import CachedSplit, CacheOutcome, prepare_cache
from trainer.data.manifest import TEST, TRAIN, VALIDATE, Item, Manifest
from trainer.settings import Settings

log = logging.getLogger("trainer")


def eval_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(tuple(size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def uint8_pixels(path: Any, size: Sequence[int]) -> np.ndarray:
    """(1, H, W, 3) uint8 RGB: the image resized exactly as eval_transform (and detection's
    eval transform) resize it, before any scaling: what a TF Lite package takes."""
    with Image.open(path) as image:
        resized = v2.Resize(tuple(size), antialias=True)(v2.ToImage()(image.convert("RGB")))
    return resized.permute(1, 2, 0)[None].numpy()


def train_transform(
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: Sequence[float],
    horizontal_flip: bool,
) -> v2.Compose:
    steps: list = [v2.ToImage(), v2.RandomResizedCrop(tuple(size), scale=tuple(crop_scale))]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def label_targets(items: Sequence[Item], labels: Sequence[str], multilabel: bool) -> torch.Tensor:
    """Each item's target: its one label's index (int64), or, for a MULTILABEL dataset, a 0 or 1
    for every label (a float32 row an item, as binary cross-entropy takes it)."""
    index_of = {label: i for i, label in enumerate(labels)}
    if not multilabel:
        return torch.tensor([index_of[item.label] for item in items], dtype=torch.int64)
    targets = torch.zeros(len(items), len(labels))
    for row, item in enumerate(items):
        targets[row, [index_of[label] for label in item.labels]] = 1.0
    return targets


class LabelledImages(Dataset):
    def __init__(
        self, items: Sequence[Item], labels: Sequence[str], transform: v2.Compose,
        multilabel: bool = False,
    ) -> None:  # fmt: skip
        self.items = list(items)
        self.targets = label_targets(self.items, labels, multilabel)
        self.transform = transform
        self.device_plan: DevicePlan | None = None  # what the module does on the device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[index]
        with Image.open(item.path) as image:
            pixels = self.transform(image.convert("RGB"))
        return pixels, self.targets[index]


def make_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    collate_fn: Callable[[list], Any] | None = None,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    batched = isinstance(dataset, CachedImages)  # its __getitems__ returns whole batches
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        # Pinned batches let Lightning's copy to the GPU run without blocking.
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        drop_last=drop_last,
        collate_fn=collate_fn or (already_batched if batched else None),
    )


# -- the decoded-image cache -------------------------------------------------------------------


class CachedImages(Dataset):
    """One split's images read from the cache, a whole batch per read, in the manifest's order.

    TRAIN batches are ``(uint8 images (B, H, W, 3), targets, original sizes)`` for the device
    augmentation; the others ``(normalized float images, targets)``, equal to the evaluation
    transform's.
    """

    def __init__(
        self,
        split: CachedSplit,
        items: Sequence[Item],
        labels: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        multilabel: bool = False,
    ) -> None:
        self.items = list(items)
        self.split, self.train = split, train
        self.mean, self.std = list(mean), list(std)
        self.rows = np.asarray([split.row_of[item.key] for item in self.items], dtype=np.int64)
        self.targets = label_targets(self.items, labels, multilabel)
        self.device_plan: DevicePlan | None = None
        self._array: np.memmap | None = None  # opened in the process that reads, not pickled
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None  # mean and std, made once

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        return self.batch(np.asarray(indices, dtype=np.int64))

    def pixels(self, indices: np.ndarray, pin: bool = False) -> torch.Tensor:
        """The uint8 (B, H, W, 3) rows of ``indices``, in pinned memory when ``pin``."""
        if self._array is None:
            self._array = self.split.open()
        images = torch.empty(
            (len(indices), *self.split.shape[1:]), dtype=torch.uint8, pin_memory=pin
        )
        # Straight into the batch: one copy, during which NumPy releases the GIL.
        np.take(self._array, self.rows[indices], axis=0, out=images.numpy(), mode="clip")
        return images

    def batch(self, indices: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, ...]:
        """One batch as the loaders hand it over; every tensor pinned when ``pin``."""
        images = self.pixels(indices, pin)
        targets = self.targets[torch.from_numpy(indices)]
        if self.train:
            hw = torch.from_numpy(self.split.source_hw[self.rows[indices]])
            return images, *_pinned((targets, hw), pin)
        if self._stats is None:
            self._stats = torch.tensor(self.mean), torch.tensor(self.std)
        return _pinned((evaluation_pixels(images, *self._stats), targets), pin)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(part[0] for part in self.__getitems__([index]))


def _pinned(tensors: tuple[torch.Tensor, ...], pin: bool) -> tuple[torch.Tensor, ...]:
    return tuple(t.pin_memory() for t in tensors) if pin else tensors


def already_batched(batch: Any) -> Any:
    """The collate function of ``CachedImages``, whose reads are batches already."""
    return batch


@dataclass
class Loaders:
    train: Iterable  # a DataLoader, or the cache's DeviceBatches or HostBatches
    val: Iterable
    test: DataLoader
    cache: CacheOutcome


def make_loaders(
    manifest: Manifest,
    settings: Settings,
    remaining_seconds: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> Loaders:
    """The TRAIN, VALIDATE and TEST loaders of one training, from the cache when it is used."""
    data, trainer = settings.data, settings.trainer
    size, mean, std = settings.model.size, data.mean, data.std
    crop_scale, flip = data.crop_scale, data.horizontal_flip
    dataset_path = settings.dataset.path
    outcome = prepare_cache(
        manifest, data.cache, data.cache_max_gb, size, crop_scale, settings.home,
        remaining_seconds, should_stop,
        str(Path(dataset_path).expanduser().resolve()) if dataset_path else "demo",
    )  # fmt: skip
    accelerator = trainer.accelerator
    plan = DevicePlan(
        channels_last=resolve_channels_last(trainer.channels_last, accelerator),
        compile=trainer.compile,
        compile_reserve_seconds=trainer.compile_reserve_seconds,
        input_size=size,
    )
    splits = {name: manifest.split(name) for name in (TRAIN, VALIDATE, TEST)}
    plan.batch_size = min(data.batch_size, len(splits[TRAIN]))  # the step's shape
    augment = train_transform(size, mean, std, crop_scale, flip)
    evaluate = eval_transform(size, mean, std)
    datasets: dict[str, Dataset] = {
        name: LabelledImages(
            items, manifest.labels, augment if name == TRAIN else evaluate, manifest.multilabel
        )
        for name, items in splits.items()
    }
    batch_size, seed = data.batch_size, settings.seed
    # A compiled step is compiled again for a new batch shape: the last, smaller batch of each
    # epoch would be a slow step. Dropping it (its images are shuffled into other epochs)
    # keeps one shape. A last batch of one image is dropped too: batch norm cannot train on
    # it ("Expected more than 1 value per channel"), which 65 TRAIN images in batches of 32
    # gave.
    train_count = len(splits[TRAIN])
    drop_last = train_count > batch_size and (trainer.compile or train_count % batch_size == 1)
    loaders: dict[str, Iterable] = {}
    if outcome.cache is not None:
        plan.augment = DeviceAugment(size, mean, std, crop_scale, flip)
        for name in (TRAIN, VALIDATE):
            datasets[name] = CachedImages(
                outcome.cache.split(name), splits[name], manifest.labels, mean, std,
                name == TRAIN, manifest.multilabel,
            )  # fmt: skip
        placement = CachePlacement(
            data.cache_on_device, data.cache_on_device_share, _on_gpu(accelerator),
            _cache_workers(data.cache_num_workers, accelerator),
        )  # fmt: skip
        loaders = placement.loaders(datasets, batch_size, seed, drop_last)
    datasets[TRAIN].device_plan = plan
    workers = data.num_workers
    for name, shuffle in ((TRAIN, True), (VALIDATE, False), (TEST, False)):
        if name not in loaders:
            last = drop_last and name == TRAIN
            loaders[name] = make_loader(datasets[name], batch_size, workers, shuffle, seed, last)
    return Loaders(loaders[TRAIN], loaders[VALIDATE], loaders[TEST], outcome)


@dataclass
class CachePlacement:
    """Where each cached split's batches come from: held on the device, or read ahead from the
    memory map (``cache_batches``), by ``data.cache_on_device`` and the device's memory."""

    mode: str  # data.cache_on_device
    share: float  # data.cache_on_device_share
    on_gpu: bool
    threads: int  # data.cache_num_workers, resolved
    memory_bytes: int | None = None  # the device's; read from the GPU when None

    def loaders(
        self, datasets: dict[str, Any], batch_size: int, seed: int, drop_last: bool
    ) -> dict[str, CachedBatches]:
        """TRAIN first: the one read at every step gets the device's memory if one must go."""
        memory = self.memory_bytes if self.memory_bytes is not None else _device_memory(self.on_gpu)
        device = partial(_training_device, self.on_gpu)
        held, loaders = 0, {}
        for name in (TRAIN, VALIDATE):
            dataset, train = datasets[name], name == TRAIN
            last, need = drop_last and train, held + held_bytes(dataset)
            if fits_on_device(self.mode, self.on_gpu, need, memory, self.share):
                held = need
                loaders[name] = DeviceBatches(dataset, batch_size, train, seed, last, device)
            else:
                loaders[name] = HostBatches(
                    dataset, batch_size, train, seed, last, self.threads, self.on_gpu
                )
        log.info("image cache: %s; data.cache_on_device=%s (%s)", self.describe(loaders),
                 self.mode, self.held_note(held, memory))  # fmt: skip
        return loaders

    def held_note(self, held: int, memory: int) -> str:
        note = f"{held / 1e9:.2f} GB held"
        if self.on_gpu:  # what auto judges by
            note += f", {self.share:g} of the GPU's {memory / 1e9:.1f} GB allowed"
        return note

    def describe(self, loaders: dict[str, CachedBatches]) -> str:
        readers = f"{self.threads} threads" if self.threads else "the training loop"
        host = f"read from the memory map by {readers}" + (", pinned" if self.on_gpu else "")
        ways = {"device": "held on the device", "host": host}
        return ", ".join(f"{name} {ways[loader.path]}" for name, loader in loaders.items())


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _device_memory(on_gpu: bool) -> int:
    if not on_gpu:
        return 0
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


def _training_device(on_gpu: bool) -> torch.device:
    """Where the model trains, asked when an epoch starts: a DDP rank's GPU is set by then."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def _cache_workers(value: Any, accelerator: str) -> int:
    """``auto``: none on the CPU (a read is a copy); on a GPU, a few to overlap reads and steps."""
    if str(value) != "auto":
        return int(value)
    if _on_gpu(accelerator):
        return min(4, max(1, (os.cpu_count() or 2) // 2))
    return 0
