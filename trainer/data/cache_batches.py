"""Batches of the decoded-image cache without a DataLoader: held on the device, or read ahead.

A DataLoader spends Python work on every image and batch (sampler, collate, worker queues),
while a cache read is a whole batch already. Two leaner paths take its place:

- ``DeviceBatches`` (``data.cache_on_device``): the split's uint8 pixels, targets and original
  sizes held as tensors on the model's device, loaded once at the first epoch; a batch is an
  ``index_select`` there. No loader threads, no host copy per batch.
- ``HostBatches``: batches read from the memory map by ``data.cache_num_workers`` threads a few
  batches ahead of the step, straight into pinned memory when the model is on a GPU (NumPy
  copies without holding the GIL, so the threads overlap the training loop).

Both draw the indices of the DataLoader they replace (``EpochOrder``): the same batches per
epoch, the same ``drop_last``, the same shuffled order, so that a training reads the same images
whichever path it takes. TRAIN batches are ``(uint8 images, targets, original sizes)`` for the
device augmentation; VALIDATE batches the evaluation transform's tensors and targets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from trainer.data.device_augment import evaluation_pixels

# A split of the cache as ``trainer.data.images.CachedImages`` reads it (``pixels``, ``batch``,
# ``targets``, ``split``, ``rows``, ``train``); named Any here, as images.py imports this module.
CachedImages = Any
Batch = tuple[torch.Tensor, ...]
Job = TypeVar("Job")
Result = TypeVar("Result")
LOAD_CHUNK_BYTES = 64 * 1024**2  # rows copied to the device at a time: no second host copy


def fits_on_device(mode: str, on_gpu: bool, nbytes: int, memory_bytes: int, share: float) -> bool:
    """``data.cache_on_device``: ``on`` holds the split on any device, ``off`` never; ``auto``
    on a GPU when its ``nbytes`` fit in ``share`` of the device's ``memory_bytes``."""
    if mode != "auto":
        return mode == "on"
    return on_gpu and nbytes <= share * memory_bytes


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) outside a distributed training."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochOrder:
    """Each epoch's dataset indices, as the DataLoader that the cache's paths replace draws them.

    One process: ``DataLoader(shuffle=True, generator=Generator().manual_seed(seed))`` without
    workers, whose iterator draws its base seed from the generator at every epoch, then its
    sampler a permutation (and one more, unused, as it runs out). Several (DDP): the
    ``DistributedSampler`` that Lightning would put in, a permutation seeded by seed + epoch,
    padded to a multiple of the ranks, a stride per rank. Lightning calls ``set_epoch`` on a
    loader's ``sampler``: this is the cached paths' sampler.
    """

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0
        self._generator = torch.Generator().manual_seed(seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Indices per epoch on this rank (the ranks are known once training has started)."""
        return math.ceil(self.size / rank_and_world()[1])

    def draw(self) -> torch.Tensor:
        """The next epoch's indices on this rank (int64, on the CPU)."""
        rank, ranks = rank_and_world()
        if ranks == 1:
            if not self.shuffle:
                return torch.arange(self.size)
            torch.empty((), dtype=torch.int64).random_(generator=self._generator)  # base seed
            order = torch.randperm(self.size, generator=self._generator)
            # RandomSampler's last line draws one more (empty) permutation as it runs out.
            torch.randperm(self.size, generator=self._generator)
            return order
        order = torch.arange(self.size)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        padding = len(self) * ranks - self.size
        if padding:  # the first indices again, as often as it takes
            order = torch.cat([order, order.repeat(math.ceil(padding / self.size))[:padding]])
        return order[rank::ranks]


class CachedBatches:
    """What both paths share: the DataLoader's length and indices, and its ``dataset``, where
    the LightningModule finds the training's ``device_plan``."""

    path = ""  # "device" or "host": what the log line and metrics.json name
    batch_sampler = None  # what Lightning looks for on a loader, besides ``sampler``

    def __init__(
        self, dataset: CachedImages, batch_size: int, shuffle: bool, seed: int, drop_last: bool
    ) -> None:
        self.dataset = dataset
        self.sampler = EpochOrder(len(dataset), shuffle, seed)
        self.batch_size, self.drop_last = batch_size, drop_last

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def starts(self) -> range:
        """Each batch's first position in the epoch's order; slicing ends the last one."""
        return range(0, len(self) * self.batch_size, self.batch_size)


class HostBatches(CachedBatches):
    """Batches read from the memory map by ``threads`` threads (none: by the caller), pinned
    when ``pin`` so that the copy to the GPU does not block."""

    path = "host"

    def __init__(
        self, dataset: CachedImages, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
        threads: int, pin: bool,
    ) -> None:  # fmt: skip
        super().__init__(dataset, batch_size, shuffle, seed, drop_last)
        self.threads, self.pin = threads, pin

    def __iter__(self) -> Iterator[Batch]:
        # A generator: nothing is drawn or started until the first batch is asked for (Lightning
        # calls iter() once just to check that the loader is iterable).
        order = self.sampler.draw().numpy()
        size, pin, read = self.batch_size, self.pin, self.dataset.batch
        jobs = (order[start : start + size] for start in self.starts())
        yield from read_ahead(lambda indices: read(indices, pin), jobs, self.threads, _on_device())


def _on_device() -> Callable[[], None] | None:
    """A reader thread's set-up: the caller's CUDA device, so that pinning a batch does not
    open a context on GPU 0 in every rank of a DDP training."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    device = torch.cuda.current_device()
    return lambda: torch.cuda.set_device(device)


def read_ahead(
    read: Callable[[Job], Result],
    jobs: Iterable[Job],
    threads: int,
    initializer: Callable[[], None] | None = None,
) -> Iterator[Result]:
    """``read(job)`` of every job, in order, by ``threads`` threads up to twice as many jobs
    ahead; by the caller when ``threads`` is 0. An epoch left early cancels what is queued."""
    if threads <= 0:
        yield from map(read, jobs)
        return
    pool = ThreadPoolExecutor(threads, "cache-reader", initializer=initializer)
    pending: deque[Future[Result]] = deque()
    try:
        for job in jobs:
            pending.append(pool.submit(read, job))
            if len(pending) > 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Held:
    """A split's tensors on one device, in the dataset's order."""

    device: torch.device
    images: torch.Tensor  # uint8 (N, H, W, 3)
    targets: torch.Tensor
    source_hw: torch.Tensor  # (N, 2): each original image's height and width
    mean: torch.Tensor
    std: torch.Tensor


class DeviceBatches(CachedBatches):
    """The split held on the device that ``device()`` names when an epoch starts (known only
    inside ``fit``: a DDP rank's GPU is chosen there); a batch is an index_select there."""

    path = "device"

    def __init__(
        self, dataset: CachedImages, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
        device: Callable[[], torch.device],
    ) -> None:  # fmt: skip
        super().__init__(dataset, batch_size, shuffle, seed, drop_last)
        self.device = device
        self._held: _Held | None = None

    def held(self) -> _Held:
        device = self.device()
        if self._held is None or self._held.device != device:
            self._held = None  # the old copy goes before the new one is made
            self._held = hold(self.dataset, device)
        return self._held

    def __iter__(self) -> Iterator[Batch]:
        held = self.held()
        order = self.sampler.draw().to(held.device)  # one small copy per epoch
        train = self.dataset.train
        for start in self.starts():
            index = order[start : start + self.batch_size]
            images = held.images.index_select(0, index)
            targets = held.targets.index_select(0, index)
            if train:
                yield images, targets, held.source_hw.index_select(0, index)
            else:
                yield evaluation_pixels(images, held.mean, held.std), targets


def hold(dataset: CachedImages, device: torch.device) -> _Held:
    """Copy a split's rows to ``device`` in the dataset's order, a chunk at a time."""
    count, shape = len(dataset), dataset.split.shape[1:]
    images = torch.empty((count, *shape), dtype=torch.uint8, device=device)
    step = max(1, LOAD_CHUNK_BYTES // math.prod(shape))
    for start in range(0, count, step):
        end = min(start + step, count)
        images[start:end].copy_(dataset.pixels(np.arange(start, end)))
    hw = torch.from_numpy(dataset.split.source_hw[dataset.rows])
    return _Held(
        device, images, dataset.targets.to(device), hw.to(device),
        torch.tensor(dataset.mean, device=device), torch.tensor(dataset.std, device=device),
    )  # fmt: skip


def held_bytes(dataset: CachedImages) -> int:
    """What holding ``dataset`` on a device takes: its pixels (targets and sizes are noise)."""
    return len(dataset) * math.prod(dataset.split.shape[1:])
