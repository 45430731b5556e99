"""Turning manifest items into tensors: the training augmentation and the evaluation transform.

Evaluation and prediction resize the whole image to the model's input size (no crop), scale to
[0, 1] and normalize; exported models document the same rule.

With the decoded-image cache (``image_cache``), the TRAIN and VALIDATE loaders read its
memory-mapped arrays instead: TRAIN batches stay uint8 and are cropped, flipped and normalized on
the device (``device_augment``); VALIDATE batches are normalized here, into the very tensors the
evaluation transform makes. TEST images are decoded as always (see ``image_cache.SPLITS``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from trainer.data.device_augment import DeviceAugment, DevicePlan, resolve_channels_last
from trainer.data.image_cache import CachedSplit, CacheOutcome, prepare_cache
from trainer.data.manifest import TEST, TRAIN, VALIDATE, Item, Manifest

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


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[Item], labels: Sequence[str], transform: v2.Compose) -> None:
        self.items = list(items)
        self.index_of = {label: i for i, label in enumerate(labels)}
        self.transform = transform
        self.device_plan: DevicePlan | None = None  # what the module does on the device

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        with Image.open(item.path) as image:
            pixels = self.transform(image.convert("RGB"))
        return pixels, self.index_of[item.label]


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
    ) -> None:
        self.items = list(items)
        self.split, self.train = split, train
        self.mean, self.std = list(mean), list(std)
        index_of = {label: i for i, label in enumerate(labels)}
        self.rows = np.asarray([split.row_of[item.key] for item in self.items], dtype=np.int64)
        self.targets = torch.tensor([index_of[item.label] for item in self.items])
        self.device_plan: DevicePlan | None = None
        self._array: np.memmap | None = None  # opened in the process that reads, not pickled

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        if self._array is None:
            self._array = self.split.open()
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        images = torch.from_numpy(self._array[rows])  # (B, H, W, 3), contiguous
        targets = self.targets[torch.as_tensor(indices, dtype=torch.long)]
        if self.train:
            return images, targets, torch.from_numpy(self.split.source_hw[rows])
        images = images.permute(0, 3, 1, 2)  # a channels_last view: no copy
        pixels = v2.functional.to_dtype_image(images, torch.float32, scale=True)
        pixels = v2.functional.normalize_image(pixels.contiguous(), self.mean, self.std)
        return pixels, targets

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(part[0] for part in self.__getitems__([index]))


def already_batched(batch: Any) -> Any:
    """The collate function of ``CachedImages``, whose reads are batches already."""
    return batch


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    test: DataLoader
    cache: CacheOutcome


def make_loaders(
    manifest: Manifest,
    cfg: dict[str, Any],
    remaining_seconds: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> Loaders:
    """The TRAIN, VALIDATE and TEST loaders of one training, from the cache when it is used."""
    data_cfg, trainer_cfg = cfg["data"], cfg["trainer"]
    size, mean, std = cfg["model"]["input_size"], data_cfg["mean"], data_cfg["std"]
    crop_scale, flip = data_cfg["crop_scale"], data_cfg["horizontal_flip"]
    # Keys added with the cache: an operation resumed from an older config goes without them.
    dataset_path = (cfg.get("dataset") or {}).get("path")
    outcome = prepare_cache(
        manifest, data_cfg.get("cache", "off"), data_cfg.get("cache_max_gb", 0), size,
        crop_scale, cfg["home"], remaining_seconds, should_stop,
        str(Path(dataset_path).expanduser().resolve()) if dataset_path else "demo",
    )  # fmt: skip
    accelerator = str(trainer_cfg["accelerator"])
    compile_ = bool(trainer_cfg.get("compile", False))
    plan = DevicePlan(
        channels_last=resolve_channels_last(trainer_cfg.get("channels_last", False), accelerator),
        compile=compile_,
        compile_reserve_seconds=float(trainer_cfg.get("compile_reserve_seconds", 180.0)),
        input_size=(int(size[0]), int(size[1])),
    )
    splits = {name: manifest.split(name) for name in (TRAIN, VALIDATE, TEST)}
    plan.batch_size = min(int(data_cfg["batch_size"]), len(splits[TRAIN]))  # the step's shape
    augment = train_transform(size, mean, std, crop_scale, flip)
    evaluate = eval_transform(size, mean, std)
    datasets = {
        name: LabelledImages(items, manifest.labels, augment if name == TRAIN else evaluate)
        for name, items in splits.items()
    }
    workers = {name: int(data_cfg["num_workers"]) for name in splits}
    if outcome.cache is not None:
        plan.augment = DeviceAugment(size, mean, std, crop_scale, flip)
        cache_workers = _cache_workers(data_cfg.get("cache_num_workers", "auto"), accelerator)
        for name in (TRAIN, VALIDATE):
            datasets[name] = CachedImages(
                outcome.cache.split(name), splits[name], manifest.labels, mean, std, name == TRAIN
            )
            workers[name] = cache_workers
    datasets[TRAIN].device_plan = plan
    batch_size, seed = int(data_cfg["batch_size"]), int(cfg["seed"])
    # A compiled step is compiled again for a new batch shape: the last, smaller batch of each
    # epoch would be a slow step. Dropping it (its images are shuffled into other epochs)
    # keeps one shape.
    drop_last = compile_ and len(splits[TRAIN]) > batch_size
    return Loaders(
        make_loader(datasets[TRAIN], batch_size, workers[TRAIN], True, seed, drop_last),
        make_loader(datasets[VALIDATE], batch_size, workers[VALIDATE], False, seed),
        make_loader(datasets[TEST], batch_size, workers[TEST], False, seed),
        outcome,
    )


def _cache_workers(value: Any, accelerator: str) -> int:
    """``auto``: none on the CPU (a read is a copy); on a GPU, a few to overlap reads and steps."""
    if str(value) != "auto":
        return int(value)
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return min(4, max(1, (os.cpu_count() or 2) // 2))
    return 0
