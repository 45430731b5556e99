"""The bundled default video dataset: a shape moving left, right, up or down, as real video files.

Generated on first use, deterministically: the same seed draws the same scenes, and the CSV (what
the dataset fingerprint reads) is always the same. Each video is a textured background with one
shape gliding across it (wrapping around the edges, so it never leaves the frame); the direction is
the label. Some videos hold two segments: halfway through, the scene cuts to a new background and
shape moving another way, and the CSV labels each half, so the data exercise several segments per
video and the shot detector has a known cut to find.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Iterable
from pathlib import Path

import av
import numpy as np
from av.video.stream import VideoStream

from trainer.data.demo import generate_once

LABELS = ("left", "right", "up", "down")
VERSION = "moving_v1"
CSV_NAME = "videos.csv"
# (dy, dx) per frame, for a speed of one pixel a frame.
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


def video_codec() -> str:
    """H.264 where this PyAV build can encode it, else MPEG-4 part 2 (always built in)."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def ensure_demo_videos(
    home: str | Path, per_label: int = 16, size: int = 64, fps: int = 10, seconds: float = 3.0
) -> Path:
    """Return the demo dataset's CSV under ``home``, generating the videos once if absent."""
    target = Path(home).expanduser() / "datasets" / f"{VERSION}_{per_label}x{size}_{fps}fps"
    generate_once(
        target,
        target / CSV_NAME,
        lambda folder: write_moving_videos(folder, per_label, size, fps, seconds, seed=0),
    )
    return target / CSV_NAME


def write_moving_videos(
    folder: Path,
    per_label: int,
    size: int = 64,
    fps: int = 10,
    seconds: float = 3.0,
    seed: int = 0,
    two_segment_videos: int | None = None,
) -> Path:
    """Write ``per_label`` one-direction videos per label, plus videos with two labelled halves
    (``per_label // 2`` unless given), and ``videos.csv`` listing their segments (UNASSIGNED).
    Returns the CSV's path."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    frames = max(2, round(seconds * fps))
    rows: list[list[str]] = []
    for label_index, label in enumerate(LABELS):
        for index in range(per_label):
            rng = np.random.default_rng([seed, label_index, index])
            name = f"videos/{label}_{index:04d}.mp4"
            write_video(folder / name, render_motion(label, frames, size, rng), fps)
            rows.append(["UNASSIGNED", name, label, "0", "inf"])
    mixed = per_label // 2 if two_segment_videos is None else two_segment_videos
    for index in range(mixed):
        rows += _write_two_segment_video(folder, index, frames, size, fps, seed)
    csv_path = folder / CSV_NAME
    with csv_path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return csv_path


def _write_two_segment_video(
    folder: Path, index: int, frames: int, size: int, fps: int, seed: int
) -> list[list[str]]:
    rng = np.random.default_rng([seed, len(LABELS), index])
    first, second = rng.choice(len(LABELS), size=2, replace=False)
    cut = frames // 2
    background = _background_colour(rng)
    other = _background_colour(rng, far_from=background)
    pixels = np.concatenate(
        [
            render_motion(LABELS[first], cut, size, rng, background),
            render_motion(LABELS[second], frames - cut, size, rng, other),
        ]
    )
    name = f"videos/two_segments_{index:04d}.mp4"
    write_video(folder / name, pixels, fps)
    cut_text = f"{cut / fps:g}"
    return [
        ["UNASSIGNED", name, LABELS[first], "0", cut_text],
        ["UNASSIGNED", name, LABELS[second], cut_text, "inf"],
    ]


def render_motion(
    direction: str,
    frames: int,
    size: int,
    rng: np.random.Generator,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Frames (N, size, size, 3) uint8 of one shape moving ``direction`` over a static texture."""
    colour = rng.integers(150, 256, 3)
    base = _background_colour(rng) if background is None else background
    noise = rng.integers(-14, 15, (size, size, 3))
    texture = np.clip(base + noise, 0, 255).astype(np.uint8)
    mask = _shape_mask(size, rng)
    speed = rng.uniform(1.5, 3.0)  # pixels a frame: visible in a clip of a few frames
    start = rng.uniform(0, size, 2)
    step = np.array(_STEP[direction]) * speed
    video = np.empty((frames, size, size, 3), np.uint8)
    for index in range(frames):
        dy, dx = np.rint(start + step * index).astype(int)
        # Rolling wraps the shape around the edges, so it stays in view for the whole video.
        moved = np.roll(mask, (dy, dx), axis=(0, 1))
        video[index] = np.where(moved[..., None], colour, texture)
    return video


def _background_colour(rng: np.random.Generator, far_from: np.ndarray | None = None) -> np.ndarray:
    while True:
        colour = rng.integers(0, 120, 3)
        # A cut must change the picture clearly, or a frame-difference shot detector misses it.
        if far_from is None or np.abs(colour - far_from).sum() >= 120:
            return colour


def _shape_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A square or a disc of a random size, centred in a size x size grid."""
    half = rng.uniform(0.1, 0.18) * size
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    if rng.random() < 0.5:
        return (np.abs(yy) <= half) & (np.abs(xx) <= half)
    return yy**2 + xx**2 <= half**2


def write_video(path: Path, frames: Iterable[np.ndarray], fps: int) -> None:
    """Encode RGB uint8 frames (H, W, 3; even sizes) into an MP4 file at ``fps``."""
    frames = iter(frames)
    first = next(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(video_codec(), rate=fps)
        assert isinstance(stream, VideoStream)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = "yuv420p"
        # Near-lossless and one keyframe a second: colours stay true and seeks stay short.
        stream.codec_context.gop_size = fps
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        else:
            stream.codec_context.bit_rate = 2_000_000
        for pixels in itertools.chain([first], frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
