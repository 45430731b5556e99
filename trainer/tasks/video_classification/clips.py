"""Turning labelled video segments into clip tensors: decoding with PyAV, sampling, resizing.

A clip is ``frames_per_clip`` frames taken every ``frame_stride`` decoded frames, from a start
inside the segment: training draws the start at random, evaluation and prediction place clips at
fixed positions (the centre of the segment for one clip; the centres of equal parts for several).
A segment shorter than a clip repeats its last frame. Each frame is resized whole to the model's
input size (bilinear, antialiased, no crop, as images are), scaled to [0, 1] and normalized;
clips are (C, T, H, W). No flips: in a dataset of motion directions, a flip changes the label.

Decoding opens the file in the process that asks, so it works in DataLoader worker processes.
A video that fails to decode at this stage is reported once per process (a logged warning) and its
item is None; ``collate_clips`` drops such items, so an epoch goes on without them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from trainer.data.images import make_loader
from trainer.tasks.video_classification.data import (
    TIME_EPSILON,
    Segment,
    seek_seconds,
    stream_fps,
    stream_offset,
)

log = logging.getLogger(__name__)


class VideoDecodeError(Exception):
    """A clip that cannot be read: missing or corrupt file, or no frame in the time range."""


@dataclass(frozen=True)
class ClipSpec:
    frames_per_clip: int
    frame_stride: int
    size: tuple[int, int]  # (height, width) every frame is resized to
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def span_frames(self) -> int:
        """Decoded frames a clip covers, first to last sampled frame included."""
        return (self.frames_per_clip - 1) * self.frame_stride + 1


def decode_clip(
    path: str | Path,
    start: float,
    end: float,
    spec: ClipSpec,
    where: float = 0.5,
    opening: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The clip (C, T, H, W) of ``[start, end)`` seconds placed at ``where`` in [0, 1] of the room
    the segment leaves around it (0: at the start, 0.5: centred, 1: ending at the end).
    ``opening``: av.open's keyword arguments (a prediction row's protocols and timeouts).

    Raises VideoDecodeError when the video cannot be read or has no frame in the range.
    """
    try:
        frames = _read_frames(str(path), start, end, spec, where, opening or {})
    except (av.FFmpegError, OSError, ValueError) as problem:
        raise VideoDecodeError(f"{path}: {problem}") from problem
    return to_clip_tensor(frames, spec)


def clip_positions(count: int) -> list[float]:
    """Fixed positions for ``count`` evaluation clips: the centres of ``count`` equal parts."""
    return [(index + 0.5) / count for index in range(count)]


def _read_frames(
    path: str, start: float, end: float, spec: ClipSpec, where: float, opening: Mapping[str, Any]
) -> np.ndarray:
    with av.open(path, **opening) as container:
        if not container.streams.video:
            raise VideoDecodeError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = stream_fps(stream)
        # Room for the clip: the segment's length less the frames the clip covers.
        room = max(0.0, (end - start) - spec.span_frames() / fps)
        clip_start = start + min(max(where, 0.0), 1.0) * room
        offset = stream_offset(stream)
        seek_seconds(container, stream, clip_start)
        picked: list[np.ndarray] = []
        taken = 0  # frames at or after clip_start seen so far, picked or not
        for frame in container.decode(stream):
            moment = (frame.time or 0.0) - offset
            if moment < clip_start - TIME_EPSILON:
                continue
            if moment >= end - TIME_EPSILON:
                break
            if taken % spec.frame_stride == 0:
                picked.append(frame.to_ndarray(format="rgb24"))
                if len(picked) == spec.frames_per_clip:
                    break
            taken += 1
    if not picked:
        raise VideoDecodeError(f"{path} has no frame in [{start:g}s, {end:g}s)")
    # A segment shorter than the clip: hold the last frame, as a player paused there would.
    picked += [picked[-1]] * (spec.frames_per_clip - len(picked))
    return np.stack(picked)


def to_clip_tensor(frames: np.ndarray, spec: ClipSpec) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (3, T, h, w) float, resized whole and normalized."""
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    if tuple(pixels.shape[-2:]) != tuple(spec.size):
        pixels = F.interpolate(
            pixels, size=tuple(spec.size), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((pixels / 255.0 - mean) / std).permute(1, 0, 2, 3).contiguous()


class VideoClips(Dataset):
    """One item per segment: (clip, label index), or None when its video fails to decode.

    ``train=True`` draws each clip's position at random (from torch's generator, which Lightning
    and the DataLoader seed per worker); otherwise clips sit at fixed positions. With
    ``clips_per_segment`` k > 1 (evaluation only) an item holds k clips, (k, C, T, H, W); the
    classifier averages their logits, so each item stays one segment.
    """

    def __init__(
        self,
        segments: Sequence[Segment],
        labels: Sequence[str],
        spec: ClipSpec,
        train: bool,
        clips_per_segment: int = 1,
    ) -> None:
        if train and clips_per_segment != 1:
            raise ValueError("training samples one random clip per segment")
        self.segments = list(segments)
        self.index_of = {label: i for i, label in enumerate(labels)}
        self.spec = spec
        self.train = train
        self.positions = clip_positions(clips_per_segment)
        self.failures: Counter = Counter()  # per video, in this process only

    def __len__(self) -> int:
        return len(self.segments)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        segment = self.segments[index]
        positions = [torch.rand(()).item()] if self.train else self.positions
        try:
            clips = [
                decode_clip(segment.path, segment.start, segment.end, self.spec, where)
                for where in positions
            ]
        except VideoDecodeError as problem:
            self._report(segment, problem)
            return None
        clip = clips[0] if len(clips) == 1 else torch.stack(clips)
        return clip, self.index_of[segment.label]

    def _report(self, segment: Segment, problem: VideoDecodeError) -> None:
        if not self.failures[segment.key]:
            log.warning("skipping a clip of %s: %s", segment.key, problem)
        self.failures[segment.key] += 1


def collate_clips(batch: list) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Stack the items that decoded; None when none did (the step then skips the batch)."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


def make_clip_loader(
    dataset: VideoClips, batch_size: int, num_workers: int, shuffle: bool, seed: int
) -> DataLoader:
    return make_loader(dataset, batch_size, num_workers, shuffle, seed, collate_fn=collate_clips)
