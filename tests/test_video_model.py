"""Clips from video segments, the video networks, and a tiny real training of the mobile model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from tests.video_helpers import RAMP_STEP, write_corrupt_video, write_ramp_video
from trainer.data.manifest import TEST, TRAIN
from trainer.errors import UserError
from trainer.tasks.pretrained import LocalWeights
from trainer.tasks.video_classification.clips import (
    ClipSpec,
    VideoClips,
    VideoDecodeError,
    clip_positions,
    collate_clips,
    decode_clip,
    make_clip_loader,
)
from trainer.tasks.video_classification.data import Segment, read_video_dataset
from trainer.tasks.video_classification.demo import write_moving_videos
from trainer.tasks.video_classification.module import VideoClassifier
from trainer.tasks.video_classification.networks import SMALL, build_video_backbone

RAW = ClipSpec(4, 2, (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels stay in [0, 1]


@pytest.fixture(scope="module")
def ramp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ramp_video(tmp_path_factory.mktemp("ramp") / "ramp.mp4", frames=20, fps=10)


@pytest.fixture(scope="module")
def moving(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated dataset, small: 8 one-direction videos and 2 with two segments."""
    folder = tmp_path_factory.mktemp("moving")
    return write_moving_videos(folder, per_label=2, size=32, fps=8, seconds=2.0, seed=1)


def frame_numbers(clip: torch.Tensor) -> list[int]:
    """Which ramp frame each time step of a RAW clip shows (frame i is grey 8 * i)."""
    return [round(value * 255 / RAMP_STEP) for value in clip[0, :, 16, 16].tolist()]


def ramp_segment(path: Path, start: float = 0.0, end: float = 2.0, label: str = "a") -> Segment:
    return Segment(path, path.name, label, start, end, TRAIN)


def test_clips_take_every_stride_frame_from_their_position(ramp: Path) -> None:
    # [1 s, 2 s) holds frames 10..19; a clip of 4 frames, stride 2, covers 7 of them.
    assert frame_numbers(decode_clip(ramp, 1.0, 2.0, RAW, where=0.0)) == [10, 12, 14, 16]
    assert frame_numbers(decode_clip(ramp, 1.0, 2.0, RAW, where=0.5)) == [12, 14, 16, 18]
    assert frame_numbers(decode_clip(ramp, 1.0, 2.0, RAW, where=1.0)) == [13, 15, 17, 19]
    # The end is exclusive, and a segment shorter than a clip holds its last frame.
    assert frame_numbers(decode_clip(ramp, 1.5, 1.7, RAW)) == [15, 15, 15, 15]
    one_by_one = ClipSpec(4, 1, (32, 32), RAW.mean, RAW.std)
    assert frame_numbers(decode_clip(ramp, 1.5, 1.7, one_by_one)) == [15, 16, 16, 16]
    assert clip_positions(1) == [0.5] and clip_positions(4) == [0.125, 0.375, 0.625, 0.875]
    with pytest.raises(VideoDecodeError, match="no frame"):
        decode_clip(ramp, 5.0, 6.0, RAW)


def test_clips_are_resized_and_normalized(ramp: Path) -> None:
    spec = ClipSpec(3, 1, (16, 24), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    clip = decode_clip(ramp, 0.0, 2.0, spec)
    assert clip.shape == (3, 3, 16, 24) and clip.dtype == torch.float32
    raw = decode_clip(ramp, 0.0, 2.0, ClipSpec(3, 1, (16, 24), RAW.mean, RAW.std))
    assert torch.allclose(clip, (raw - 0.5) / 0.25, atol=1e-5)


def test_training_draws_positions_at_random_evaluation_at_fixed_ones(ramp: Path) -> None:
    segments = [ramp_segment(ramp, 0.0, 2.0)]
    train = VideoClips(segments, ["a"], RAW, train=True)
    evaluation = VideoClips(segments, ["a"], RAW, train=False)
    torch.manual_seed(0)
    starts = {frame_numbers(train[0][0])[0] for _ in range(12)}
    assert len(starts) > 2 and starts <= set(range(0, 14))
    assert frame_numbers(evaluation[0][0]) == frame_numbers(evaluation[0][0]) == [7, 9, 11, 13]
    several = VideoClips(segments, ["a"], RAW, train=False, clips_per_segment=2)
    clips, label = several[0]
    assert clips.shape == (2, 3, 4, 32, 32) and label == 0
    assert [frame_numbers(clip)[0] for clip in clips] == [4, 10]
    with pytest.raises(ValueError):
        VideoClips(segments, ["a"], RAW, train=True, clips_per_segment=2)


def test_unreadable_videos_are_reported_and_dropped_not_fatal(
    tmp_path: Path, ramp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = shutil.copy(ramp, tmp_path / "good.mp4")
    # Readable when the dataset was read, broken or gone by the time the epoch decodes them.
    corrupt = write_corrupt_video(tmp_path / "corrupt.mp4", source=ramp)
    segments = [ramp_segment(Path(good), label="a"), ramp_segment(corrupt, label="b")]
    segments += [ramp_segment(tmp_path / "gone.mp4", label="b")]
    clips = VideoClips(segments, ["a", "b"], RAW, train=False)
    with caplog.at_level(logging.WARNING, logger="trainer.tasks.video_classification.clips"):
        items = [clips[i] for i in range(3)] + [clips[1]]
    assert items[0] is not None and items[1] is None and items[2] is None
    assert clips.failures == {"corrupt.mp4": 2, "gone.mp4": 1}
    assert sum("corrupt.mp4" in record.message for record in caplog.records) == 1  # once each
    batch, labels = collate_clips(items)
    assert batch.shape == (1, 3, 4, 32, 32) and labels.tolist() == [0]
    assert collate_clips([None, None]) is None
    # The same in a DataLoader worker process: the epoch goes on without the broken videos.
    loader = make_clip_loader(clips, batch_size=2, num_workers=1, shuffle=False, seed=0)
    batches = list(loader)
    assert [None if b is None else b[1].tolist() for b in batches] == [[0], None]


def test_network_builders() -> None:
    clips = torch.randn(2, 3, 4, 32, 32)
    small = build_video_backbone(SMALL, num_classes=5, pretrained=None)
    assert small(clips).shape == (2, 5)
    assert sum(p.numel() for p in small.parameters()) < 500_000
    cloud = build_video_backbone("r2plus1d_18", num_classes=3, pretrained=None)
    assert cloud.fc.out_features == 3
    with torch.no_grad():
        assert cloud.eval()(clips[:1]).shape == (1, 3)
    with pytest.raises(UserError, match="not a video network"):
        build_video_backbone("resnet50", 3)
    with pytest.raises(UserError, match="no pretrained weights"):
        build_video_backbone(SMALL, 3, LocalWeights("r2plus1d_small", Path("none")))


def test_classifier_averages_clips_of_a_segment_and_skips_empty_batches() -> None:
    backbone = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    module = VideoClassifier(backbone, num_classes=3, lr=1e-3, weight_decay=0.0)
    clips = torch.randn(2, 4, 3, 2, 8, 8)  # two segments of four clips each
    expected = backbone(clips.flatten(0, 1)).view(2, 4, 3).mean(dim=1)
    assert torch.allclose(module(clips), expected)
    assert module(clips[:, 0]).shape == (2, 3)
    assert module.training_step(None, 0) is None
    module.validation_step(None, 0)
    module.test_step(None, 0)


def test_lightning_skips_batches_whose_videos_all_failed(tmp_path: Path, ramp: Path) -> None:
    segments = [ramp_segment(ramp, label="a"), ramp_segment(tmp_path / "gone.mp4", label="b")]
    segments += [ramp_segment(ramp, 0.0, 1.0, label="b")]
    clips = VideoClips(segments, ["a", "b"], RAW, train=True)
    loader = make_clip_loader(clips, batch_size=1, num_workers=0, shuffle=False, seed=0)
    backbone = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(3, 2))
    module = VideoClassifier(backbone, num_classes=2, lr=1e-2, weight_decay=0.0)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 4  # two good batches an epoch; the failed one skipped
    assert {"train_loss", "val_accuracy"} <= set(trainer.callback_metrics)
    trainer.test(module, loader, verbose=False)
    assert "test_accuracy" in trainer.callback_metrics


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_mobile_model_learns_from_generated_videos(moving: Path) -> None:
    manifest = read_video_dataset(moving)
    spec = ClipSpec(4, 2, (32, 32), (0.45, 0.45, 0.45), (0.25, 0.25, 0.25))
    pl.seed_everything(0, verbose=False)
    # All segments, a dozen steps: enough to show the loss falling, in seconds on a CPU.
    train = make_clip_loader(
        VideoClips(manifest.segments, manifest.labels, spec, train=True), 6, 0, True, seed=0
    )
    backbone = build_video_backbone(SMALL, len(manifest.labels), pretrained=None)
    module = VideoClassifier(backbone, len(manifest.labels), lr=3e-3, weight_decay=1e-4)
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_steps=12,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(module, train)
    first, last = recorder.losses[:3], recorder.losses[-3:]
    assert len(recorder.losses) == 12
    assert sum(last) / 3 < 0.85 * sum(first) / 3, recorder.losses

    evaluation = VideoClips(manifest.split(TEST), manifest.labels, spec, train=False)
    trainer.test(module, make_clip_loader(evaluation, 8, 0, False, seed=0), verbose=False)
    assert {"test_accuracy", "test_loss"} <= set(trainer.callback_metrics)
