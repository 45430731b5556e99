"""The cache's two DataLoader-free paths (data.cache_on_device): the split held on the device,
and batches read ahead from the memory map. On the CPU, as `on` allows: the same batches per
epoch as the DataLoader, every TRAIN image once per epoch, VALIDATE tensors bit for bit, the
share-of-memory rule, refused values, and a short training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from tests.test_image_cache import loaders_for as cached_loaders
from tests.test_image_cache import tiny_backbone
from trainer.data import cache_batches
from trainer.data.cache_batches import DeviceBatches, EpochOrder, HostBatches, fits_on_device
from trainer.data.images import CachePlacement
from trainer.data.manifest import TRAIN, VALIDATE
from trainer.data.settings import cache_on_device_mode, cache_on_device_share
from trainer.errors import UserError

BATCH = 16
GB = 10**9


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: built by the first loaders, read by the others."""
    return tmp_path_factory.mktemp("device_cache_home")


def loaders_for(folder: Path, home: Path, cache: str = "on", compile_: bool = False, **data):
    data = {"cache_on_device": "off", "cache_on_device_share": 0.25, **data}
    return cached_loaders(folder, home, cache, compile_, batch_size=BATCH, seed=5, **data)


def epochs(loader, count: int = 2) -> list[list[tuple[torch.Tensor, ...]]]:
    return [list(loader) for _ in range(count)]


def recorded_orders(loader) -> list[torch.Tensor]:
    """Every order the loader's sampler draws, kept as it is drawn."""
    orders: list[torch.Tensor] = []
    draw = loader.sampler.draw

    def recording() -> torch.Tensor:
        orders.append(draw())
        return orders[-1]

    loader.sampler.draw = recording
    return orders


@pytest.mark.parametrize("compile_", [False, True])  # True: drop_last, one batch shape
def test_device_host_and_dataloader_paths_draw_the_same_batches(
    tiny_shapes: Path, home: Path, compile_: bool
) -> None:
    device = loaders_for(tiny_shapes, home, compile_=compile_, cache_on_device="on")
    host = loaders_for(tiny_shapes, home, compile_=compile_, cache_on_device="off")
    plain = loaders_for(tiny_shapes, home, cache="off", compile_=compile_)
    assert isinstance(device.train, DeviceBatches) and isinstance(device.val, DeviceBatches)
    assert isinstance(host.train, HostBatches) and isinstance(host.val, HostBatches)
    assert len(device.train) == len(host.train) == len(plain.train)
    orders = recorded_orders(device.train)
    device_epochs, host_epochs = epochs(device.train), epochs(host.train)
    plain_epochs = epochs(plain.train)
    targets = device.train.dataset.targets
    size = len(targets)
    for epoch, order in enumerate(orders):
        assert sorted(order.tolist()) == list(range(size))  # every TRAIN image once an epoch
        batches = zip(device_epochs[epoch], host_epochs[epoch], plain_epochs[epoch], strict=True)
        drawn: list[int] = []
        for (images, labels, hw), (host_images, host_labels, host_hw), (_, plain_labels) in batches:
            assert images.dtype == torch.uint8 and images.shape[1:] == (42, 42, 3)
            assert torch.equal(images, host_images) and torch.equal(hw, host_hw)
            # The DataLoader's seeded order, epoch after epoch.
            assert torch.equal(labels, host_labels) and torch.equal(labels, plain_labels)
            assert len(labels) == BATCH or not compile_  # drop_last keeps one shape
            drawn += labels.tolist()
        kept = len(drawn)  # all of them, or all but the dropped last batch
        assert Counter(drawn) == Counter(targets[order[:kept]].tolist())
    assert not torch.equal(orders[0], orders[1])  # shuffled per epoch


def test_validation_batches_are_the_decoded_tensors_bit_for_bit(
    tiny_shapes: Path, home: Path
) -> None:
    device = loaders_for(tiny_shapes, home, cache_on_device="on")
    host = loaders_for(tiny_shapes, home, cache_on_device="off")
    plain = loaders_for(tiny_shapes, home, cache="off")
    assert len(device.val) == len(host.val) == len(plain.val)
    for _ in range(2):  # the same every epoch: not shuffled
        triples = zip(device.val, host.val, plain.val, strict=True)
        for (images, targets), (host_images, host_targets), (
            plain_images,
            plain_targets,
        ) in triples:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            assert torch.equal(images, plain_images) and torch.equal(images, host_images)
            assert torch.equal(targets, plain_targets) and torch.equal(targets, host_targets)


def test_augmented_device_batches_have_the_pixel_statistics_of_decoded_ones(
    tiny_shapes: Path, home: Path
) -> None:
    torch.manual_seed(0)
    device = loaders_for(tiny_shapes, home, cache_on_device="on")
    plain = loaders_for(tiny_shapes, home, cache="off")
    augment = device.train.dataset.device_plan.augment
    augmented = torch.cat(
        [augment(images, hw) for epoch in epochs(device.train, 3) for images, _, hw in epoch]
    )
    decoded = torch.cat([images for epoch in epochs(plain.train, 3) for images, _ in epoch])
    assert augmented.shape == decoded.shape
    for dims in ((0, 2, 3), None):  # per channel, and over all pixels
        mean_a, mean_b = augmented.mean(dims or ()), decoded.mean(dims or ())
        std_a, std_b = augmented.std(dims or ()), decoded.std(dims or ())
        assert torch.allclose(mean_a, mean_b, atol=0.05), (mean_a, mean_b)
        assert torch.allclose(std_a, std_b, rtol=0.05), (std_a, std_b)


def test_reader_threads_change_nothing_and_an_epoch_left_early_stops_them(
    tiny_shapes: Path, home: Path
) -> None:
    inline = loaders_for(tiny_shapes, home, cache_num_workers=0)
    threaded = loaders_for(tiny_shapes, home, cache_num_workers=2)
    assert (inline.train.threads, threaded.train.threads) == (0, 2)
    for a, b in zip(epochs(inline.train), epochs(threaded.train), strict=True):
        for batch_a, batch_b in zip(a, b, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b, strict=True))
    started = iter(threaded.train)
    next(started)
    started.close()  # as when the budget stops an epoch: the queued reads are cancelled
    assert len(list(threaded.train)) == len(threaded.train)


@pytest.mark.parametrize("size, shuffle", [(10, True), (11, True), (11, False), (2, True)])
def test_ranks_draw_what_lightnings_distributed_sampler_draws(
    monkeypatch: pytest.MonkeyPatch, size: int, shuffle: bool
) -> None:
    ranks, seed = 3, 7
    for rank in range(ranks):
        monkeypatch.setattr(cache_batches, "rank_and_world", lambda r=rank: (r, ranks))
        order = EpochOrder(size, shuffle, seed)
        sampler = DistributedSampler(range(size), ranks, rank, shuffle=shuffle, seed=seed)
        for epoch in (0, 1):
            order.set_epoch(epoch)
            sampler.set_epoch(epoch)
            assert order.draw().tolist() == list(sampler)
            assert len(order) == len(sampler)


def test_auto_holds_what_fits_in_the_share_of_a_gpus_memory() -> None:
    assert fits_on_device("auto", True, 20 * GB, 80 * GB, 0.25)
    assert not fits_on_device("auto", True, 20 * GB + 1, 80 * GB, 0.25)
    assert fits_on_device("auto", True, 30 * GB, 80 * GB, 0.5)
    assert not fits_on_device("auto", False, 1, 80 * GB, 0.25)  # a CPU accelerator: off
    assert fits_on_device("on", False, 10**15, 0, 0.25)  # on: whatever the size and device
    assert not fits_on_device("off", True, 1, 80 * GB, 1.0)


class Split:
    """What the placement reads of a cached split: its length and row shape."""

    def __init__(self, rows: int, side: int) -> None:
        self.rows, self.split = rows, SimpleNamespace(shape=(rows, side, side, 3))

    def __len__(self) -> int:
        return self.rows


@pytest.mark.parametrize(
    "memory_gb, on_gpu, expected",
    [
        (80, True, ("device", "device")),  # both fit in 20 GB
        (40, True, ("device", "host")),  # TRAIN (7.5 GB) fits in 10 GB, not with VALIDATE
        (20, True, ("host", "device")),  # not TRAIN (7.5 > 5 GB); VALIDATE alone fits
        (80, False, ("host", "host")),  # auto on a CPU accelerator
    ],
)
def test_the_placement_puts_train_on_the_device_first(
    memory_gb: int, on_gpu: bool, expected: tuple[str, str]
) -> None:
    side = 50
    datasets = {TRAIN: Split(1_000_000, side), VALIDATE: Split(400_000, side)}  # 7.5 + 3 GB
    placement = CachePlacement("auto", 0.25, on_gpu, threads=2, memory_bytes=memory_gb * GB)
    loaders = placement.loaders(datasets, BATCH, seed=0, drop_last=False)
    assert (loaders[TRAIN].path, loaders[VALIDATE].path) == expected


def test_auto_on_a_cpu_accelerator_reads_from_the_memory_map(tiny_shapes: Path, home: Path) -> None:
    loaders = loaders_for(tiny_shapes, home, cache_on_device="auto", cache_on_device_share=1.0)
    assert isinstance(loaders.train, HostBatches) and isinstance(loaders.val, HostBatches)
    assert not loaders.train.pin  # pinned only for a GPU


@pytest.mark.parametrize(
    "key, value",
    [
        ("cache_on_device", "sometimes"),
        ("cache_on_device", 2),
        ("cache_on_device_share", 0),
        ("cache_on_device_share", 1.5),
        ("cache_on_device_share", "a quarter"),
        ("cache_on_device_share", True),
        ("cache_on_device_share", float("nan")),
    ],
)
def test_bad_values_are_refused_in_one_line(
    tiny_shapes: Path, tmp_path: Path, key: str, value: object
) -> None:
    with pytest.raises(UserError, match=f"data.{key}=") as refused:
        loaders_for(tiny_shapes, tmp_path / "home", **{key: value})
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "home").exists()  # refused before a cache is built


def test_settings_read_yaml_booleans_and_fractions() -> None:
    assert [cache_on_device_mode(v) for v in (True, False, "AUTO", "on")] == [
        "on", "off", "auto", "on",
    ]  # fmt: skip
    assert cache_on_device_share(0.25) == 0.25 and cache_on_device_share(1) == 1.0


def test_a_short_training_on_the_device_path_completes(
    tiny_shapes: Path, home: Path, tmp_path: Path
) -> None:
    """As trainer/job/fitting.py trains: a sanity validation batch, the budget callback, two
    epochs with validation; the module augments the uint8 batches drawn on the device."""
    import lightning.pytorch as pl

    from budgets import BudgetMeter
    from budgets.callback import BudgetStopping
    from trainer.tasks.image_classification.module import ImageClassifier

    loaders = loaders_for(tiny_shapes, home, cache_on_device="on")
    assert isinstance(loaders.train, DeviceBatches)
    budget = BudgetStopping(BudgetMeter(100), final_eval_batches=1, save_seconds=1.0)
    module = ImageClassifier(tiny_backbone(6), 6, 1e-2, 0.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, num_sanity_val_steps=1, callbacks=[budget],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loaders.train, loaders.val)
    assert trainer.global_step == 2 * len(loaders.train)
    assert module._plan.augment is loaders.train.dataset.device_plan.augment
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
    assert trainer.num_val_batches == [len(loaders.val)]
