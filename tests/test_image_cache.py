"""The decoded-image cache and the device augmentation: build, reuse, invalidation, a killed
build resumed, the same batches with and without the cache, and the build's cost."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests import typed
from tests.conftest import FAST, REPO, read_json, run_dirs, run_trainer
from trainer.data import image_cache
from trainer.data.device_augment import DeviceAugment
from trainer.data.images import CachedImages, LabelledImages, make_loaders, train_transform
from trainer.data.manifest import TEST, TRAIN, VALIDATE, read_dataset

SIZE = [32, 32]
SCALE = [0.6, 1.0]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture
def dataset(tmp_path: Path, tiny_shapes: Path) -> Path:
    """A private copy of the tiny shapes, free to change."""
    return Path(shutil.copytree(tiny_shapes, tmp_path / "shapes"))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every image the cache decodes, in order."""
    calls: list[Path] = []
    real = image_cache.decode

    def counting(path: Path, size: tuple[int, int]):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(image_cache, "decode", counting)
    return calls


def prepare(folder: Path, home: Path, mode: str = "on", **kwargs) -> image_cache.CacheOutcome:
    manifest = read_dataset(folder)
    defaults = {"max_gb": 1.0, "remaining_seconds": 3600.0}
    args = {**defaults, **kwargs}
    return image_cache.prepare_cache(
        manifest, mode, args["max_gb"], SIZE, SCALE, home, args["remaining_seconds"],
        source=str(folder),
    )  # fmt: skip


def test_build_then_reuse_decodes_nothing(dataset: Path, tmp_path: Path, decodes) -> None:
    home = tmp_path / "home"
    first = prepare(dataset, home)
    manifest = read_dataset(dataset)
    total = len(manifest.split(TRAIN)) + len(manifest.split(VALIDATE))  # TEST is not cached
    assert first.cache is not None and first.build_seconds > 0
    assert len(decodes) == total
    assert first.cache.directory.parent == home / "cache" / "images"
    # TRAIN rows carry the crop's margin; the others are at the input size.
    assert first.cache.split(TRAIN).shape[1:] == (42, 42, 3)  # ceil(32 / sqrt(0.6))
    assert first.cache.split(VALIDATE).shape[1:] == (32, 32, 3)
    assert not list((home / "cache" / "images").glob(".*.staging"))

    decodes.clear()
    second = prepare(dataset, home)
    assert second.note == "reused" and second.build_seconds == 0.0
    assert second.cache.directory == first.cache.directory
    assert decodes == []


def test_off_and_a_small_allowance_build_nothing(dataset: Path, tmp_path: Path, decodes) -> None:
    assert prepare(dataset, tmp_path / "a", mode="off").cache is None
    refused = prepare(dataset, tmp_path / "b", mode="auto", max_gb=1e-6)
    assert refused.cache is None and "data.cache_max_gb" in refused.note
    assert decodes == []
    # `on` ignores the allowance.
    assert prepare(dataset, tmp_path / "c", mode="on", max_gb=1e-6).cache is not None
    with pytest.raises(image_cache.UserError, match="data.cache='sometimes'"):
        prepare(dataset, tmp_path / "d", mode="sometimes")


def test_an_unusable_home_means_no_cache_not_a_failed_training(
    dataset: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    home.write_text("a file where the trainer home should be")
    outcome = prepare(dataset, home, mode="on")
    assert outcome.cache is None and "home" in outcome.note


def test_a_dataset_change_makes_a_new_cache_and_drops_the_old(
    dataset: Path, tmp_path: Path, decodes
) -> None:
    home = tmp_path / "home"
    old = prepare(dataset, home).cache
    # An image replaced in place: same paths, labels and splits, other pixels.
    victim = next(p for p in sorted((dataset / "circle").iterdir()))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(victim)
    decodes.clear()
    new = prepare(dataset, home).cache
    assert new is not None and new.directory != old.directory
    changed = read_dataset(dataset)
    assert len(decodes) == len(changed.items) - len(changed.split(TEST))
    assert not old.directory.exists()  # the stale cache is gone
    # An image added: a new fingerprint, a new key.
    Image.new("RGB", (40, 40), (0, 0, 255)).save(dataset / "square" / "extra.png")
    newest = prepare(dataset, home).cache
    assert newest.directory.name.split("-")[0] != new.directory.name.split("-")[0]
    assert [p.name for p in (home / "cache" / "images").iterdir() if p.is_dir()] == [
        newest.directory.name
    ]


KILL_AFTER = 48  # images: three chunks of 16


def test_a_killed_build_resumes_where_it_stopped(
    dataset: Path, tmp_path: Path, decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    script = textwrap.dedent(
        f"""
        import os, signal
        from trainer.data import image_cache
        from trainer.data.manifest import read_dataset
        image_cache.CHUNK = 16
        manifest = read_dataset({str(dataset)!r})
        layout = image_cache.Layout.of(manifest, {SIZE}, {SCALE})

        def die(done, total):
            if done >= {KILL_AFTER}:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind

        image_cache.build_cache(manifest, layout, {str(home)!r}, on_chunk=die)
        """
    )
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120)
    assert killed.returncode == -9
    root = home / "cache" / "images"
    (staging,) = root.glob(".*.staging")
    manifest = read_dataset(dataset)
    monkeypatch.setattr(image_cache, "CHUNK", 16)
    layout = image_cache.Layout.of(manifest, SIZE, SCALE)
    assert image_cache.open_cache(home, layout) is None  # a half-built cache is never read

    resumed = image_cache.build_cache(manifest, layout, home)
    assert resumed.cache is not None
    assert len(decodes) == len(manifest.items) - len(manifest.split(TEST)) - KILL_AFTER
    assert not staging.exists()

    fresh = image_cache.build_cache(manifest, layout, tmp_path / "fresh")
    for split in image_cache.SPLITS:
        a, b = resumed.cache.split(split), fresh.cache.split(split)
        assert np.array_equal(a.open(), b.open()), split
        assert np.array_equal(a.source_hw, b.source_hw)


def loaders_for(
    folder: Path, home: Path, cache: str = "on", compile_: bool = False, batch_size: int = 8,
    seed: int = 3, **data: object,
):  # fmt: skip
    """The loaders of a training on ``folder`` on the CPU; ``data`` overrides the data config."""
    cfg = typed.settings(
        model={"input_size": SIZE},
        data={
            "batch_size": batch_size,
            "num_workers": 0,
            "crop_scale": SCALE,
            "horizontal_flip": True,
            "mean": MEAN,
            "std": STD,
            "cache": cache,
            "cache_max_gb": 1,
            "cache_num_workers": "auto",
            **data,
        },
        trainer={"accelerator": "cpu", "channels_last": "auto", "compile": compile_},
        seed=seed,
        home=str(home),
    )
    return make_loaders(read_dataset(folder), cfg, remaining_seconds=3600)


def test_evaluation_batches_are_the_same_with_and_without_the_cache(
    dataset: Path, tmp_path: Path
) -> None:
    cached = loaders_for(dataset, tmp_path / "home", "on")
    plain = loaders_for(dataset, tmp_path / "home", "off")
    assert isinstance(cached.val.dataset, CachedImages)
    assert isinstance(plain.val.dataset, LabelledImages)
    assert isinstance(cached.test.dataset, LabelledImages)  # decoded: nodeQps includes it
    for with_cache, without in ((cached.val, plain.val), (cached.test, plain.test)):
        pairs = list(zip(with_cache, without, strict=True))
        for (images_a, targets_a), (images_b, targets_b) in pairs:
            assert torch.equal(targets_a, targets_b)
            assert images_a.dtype == images_b.dtype == torch.float32
            assert torch.equal(images_a, images_b)  # bit for bit
        assert with_cache.dataset.items == without.dataset.items

    # TRAIN: the same images in the same shuffled order, uint8 with their original sizes.
    (images, targets, source_hw), (_, plain_targets) = (
        next(iter(cached.train)),
        next(iter(plain.train)),
    )
    assert images.dtype == torch.uint8 and images.shape[1:] == (42, 42, 3)
    assert torch.equal(targets, plain_targets)
    assert source_hw.tolist()[0] == [32, 32]  # the tiny shapes are 32 pixels square
    plan = cached.train.dataset.device_plan
    assert plan.augment is not None and not plan.channels_last  # CPU defaults
    augmented = plan.augment(images, source_hw)
    assert augmented.shape == (8, 3, 32, 32) and augmented.dtype == torch.float32


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red encodes x, green encodes y: a crop's box can be read back from its pixels."""
    x = (np.arange(width) + 0.5) / width * 255
    y = (np.arange(height) + 0.5) / height * 255
    pixels = np.zeros((height, width, 3), dtype=np.float64)
    pixels[..., 0] = x[None, :]
    pixels[..., 1] = y[:, None]
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def box_statistics(batch: torch.Tensor) -> dict[str, float]:
    """From (N, 3, H, W) [0, 1] outputs: crop width and height fractions, centre, flips."""
    red, green = batch[:, 0], batch[:, 1]
    left, right = red[:, :, 0].mean(1), red[:, :, -1].mean(1)
    top, bottom = green[:, 0, :].mean(1), green[:, -1, :].mean(1)
    width, height = (right - left).abs(), bottom - top
    return {
        "width": width.mean().item(),
        "width_sd": width.std().item(),
        "height": height.mean().item(),
        "height_sd": height.std().item(),
        "centre_x": ((left + right) / 2).mean().item(),
        "centre_y": ((top + bottom) / 2).mean().item(),
        "flipped": (left > right).float().mean().item(),
    }


@pytest.mark.parametrize("width, height", [(96, 48), (40, 64), (60, 52)])
def test_device_crops_have_the_distribution_of_the_cpu_transform(
    tmp_path: Path, width: int, height: int
) -> None:
    source = coordinate_image(width, height)
    source.save(tmp_path / "coords.png")
    draws = 1500
    # The CPU path: torchvision's RandomResizedCrop and flip on the decoded image.
    torch.manual_seed(0)
    cpu = train_transform(SIZE, [0, 0, 0], [1, 1, 1], SCALE, True)
    cpu_batch = torch.stack([cpu(source) for _ in range(draws)])
    # The cached path: the image stored at the TRAIN resolution (squashed to a square), then
    # cropped on the device, knowing its original size.
    pixels, hw = image_cache.decode(tmp_path / "coords.png", (42, 42))
    cached = torch.from_numpy(pixels).expand(draws, 42, 42, 3)
    source_hw = torch.tensor([hw] * draws)
    augment = DeviceAugment(SIZE, [0, 0, 0], [1, 1, 1], SCALE, True)
    generator = torch.Generator().manual_seed(1)
    device_batch = augment(cached.contiguous(), source_hw, generator)

    expected, found = box_statistics(cpu_batch), box_statistics(device_batch)
    for key, value in expected.items():
        assert found[key] == pytest.approx(value, abs=0.03), (key, expected, found)


def test_normalization_matches_the_cpu_transform() -> None:
    """A crop of the whole image, unflipped, at the same size: exactly what ToDtype and
    Normalize make of the same pixels."""
    from trainer.data.device_augment import normalize, resized_crop

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    out = normalize(
        resized_crop(images, boxes, torch.zeros(4, dtype=torch.bool), (32, 32)), MEAN, STD
    )
    from torchvision.transforms import v2

    expected = v2.functional.normalize_image(
        v2.functional.to_dtype_image(images, torch.float32, scale=True), MEAN, STD
    )
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_build_that_would_not_fit_the_budget_stops_and_resumes_later(
    dataset: Path, tmp_path: Path, decodes
) -> None:
    home = tmp_path / "home"
    starved = prepare(dataset, home, remaining_seconds=1e-3)
    assert starved.cache is None and "0 of" in starved.note
    assert decodes == []
    assert list((home / "cache" / "images").glob(".*.staging"))  # kept for the next training
    assert prepare(dataset, home).cache is not None


def test_auto_builds_only_what_can_finish_now_and_on_what_fits(
    dataset: Path, tmp_path: Path, decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = min(16, os.cpu_count() or 1)
    # Before anything is measured, an image is taken to cost a second.
    monkeypatch.setattr(image_cache, "SECONDS_PER_IMAGE_PRIOR", float(workers))
    manifest = read_dataset(dataset)
    first_chunk = min(image_cache.CHUNK, len(manifest.split(TRAIN)))
    total = len(manifest.split(TRAIN)) + len(manifest.split(VALIDATE))
    assert first_chunk < total
    # The build may take half the budget left: more than the first chunk, less than the whole
    # at the prior's rate. auto decodes a first chunk to measure the real rate, which then
    # lets the whole through (the prior alone refused it).
    remaining = first_chunk + total
    auto = prepare(dataset, tmp_path / "a", mode="auto", remaining_seconds=remaining)
    assert auto.cache is not None and len(decodes) == total
    on = prepare(dataset, tmp_path / "b", mode="on", remaining_seconds=remaining)
    assert on.cache is not None  # the first chunk's real rate then lets the rest through
    # Less than the first chunk at the prior's rate: nothing is decoded.
    decodes.clear()
    starved = prepare(dataset, tmp_path / "c", mode="auto", remaining_seconds=first_chunk)
    assert starved.cache is None and decodes == []


def test_auto_stops_after_the_first_chunk_when_the_whole_would_not_fit(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = read_dataset(dataset)
    total = len(manifest.split(TRAIN)) + len(manifest.split(VALIDATE))
    first_chunk = min(image_cache.CHUNK, len(manifest.split(TRAIN)))
    decode = image_cache.decode

    def slow_decode(path, size):
        time.sleep(0.02)  # every image costs 20 ms of one worker
        return decode(path, size)

    monkeypatch.setattr(image_cache, "decode", slow_decode)
    monkeypatch.setattr(image_cache, "SECONDS_PER_IMAGE_PRIOR", 0.0)  # the prior lets it start
    workers = min(16, os.cpu_count() or 1)
    # Half the budget left (what a build may take) is the first chunk's time at best: the
    # measured rate leaves no room for the rest.
    assert first_chunk < total
    remaining = 2 * 0.02 * first_chunk / workers
    auto = prepare(dataset, tmp_path / "a", mode="auto", remaining_seconds=remaining)
    assert auto.cache is None and "of" in auto.note
    assert list((tmp_path / "a" / "cache" / "images").glob(".*.staging"))  # kept for the next


def test_a_training_bills_the_cache_build(tmp_path: Path, tiny_shapes: Path) -> None:
    home = tmp_path / "home"  # a home of its own: nothing cached yet
    result = run_trainer(
        *FAST, f"dataset.path={tiny_shapes}", "data.cache=on",
        "budget.train_budget_milli_node_hours=25",
        # A compile that the budget cannot also cover is skipped, not started.
        "trainer.compile=true", "trainer.compile_reserve_seconds=100000",
        cwd=tmp_path, home=home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image cache: building" in result.stderr
    assert "of this training's cost went to building it" in result.stderr
    assert "trainer.compile: skipped" in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    metrics = read_json(run_dir / "metrics.json")
    meta = read_json(run_dir / "model.json")["imageClassificationModelMetadata"]
    cost = int(meta["trainCostMilliNodeHours"])
    assert metrics["cacheBuildSeconds"] > 0
    # The build is inside the billed time, and the whole stays within the budget.
    assert metrics["cacheBuildSeconds"] <= cost * 3.6
    assert cost <= 25
    assert math.isfinite(metrics["test_accuracy"])
    assert list((home / "cache" / "images").glob("*-32x32-42x42-v*"))


class FakeClock:
    """The budget meter's clock: a millisecond per reading, plus what a fake compile takes."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def tiny_backbone(classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, classes),
    )


def test_a_slow_compile_before_the_first_step_does_not_stop_training_early(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning.pytorch as pl

    from budgets import BudgetMeter
    from budgets.callback import BudgetStopping
    from trainer.tasks.image_classification.module import ImageClassifier

    clock = FakeClock()

    def slow_compile(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
        clock.now += 200.0  # a compile that takes 200 of the budget's 360 seconds
        return model

    monkeypatch.setattr(torch, "compile", slow_compile)
    loaders = loaders_for(dataset, tmp_path / "home", "on")
    plan = loaders.train.dataset.device_plan
    plan.compile, plan.compile_reserve_seconds = True, 150.0
    meter = BudgetMeter(100, clock=clock)  # 360 seconds
    budget = BudgetStopping(meter, final_eval_batches=len(loaders.test), save_seconds=1.0)
    module = ImageClassifier(tiny_backbone(6), 6, 1e-3, 0.0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=4, callbacks=[budget], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, loaders.train, loaders.val)
    assert module._compiled is module.backbone  # what the fake compile returned
    # Had the compile been part of the first step, that step's 200 s would have made the next
    # one look unaffordable with 160 s left.
    assert budget.steps_done == 4 and not budget.stopped_by_budget
    assert meter.elapsed_seconds() > 200


def test_the_compile_warm_up_leaves_weights_statistics_and_gradients_alone() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import Precision

    from trainer.tasks.image_classification.module import ImageClassifier

    module = ImageClassifier(tiny_backbone(3), 3, 1e-3, 0.0)
    module._plan.batch_size, module._plan.input_size = 4, (16, 16)
    module._trainer = SimpleNamespace(precision_plugin=Precision())
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    module._warm_up(module.backbone)
    after = module.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in module.parameters())
