"""Small real videos for the video tests: a brightness ramp whose frames tell their own index."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.tasks.video_classification.demo import write_video

RAMP_STEP = 8  # grey level added per frame: frame i is grey 8 * i


def write_ramp_video(path: Path, frames: int = 20, fps: int = 10, size: int = 32) -> Path:
    """Frame i is a flat grey of ``RAMP_STEP * i``, so a decoded pixel says which frame it is."""
    pixels = np.zeros((frames, size, size, 3), np.uint8)
    for index in range(frames):
        pixels[index] = min(255, RAMP_STEP * index)
    write_video(path, pixels, fps)
    return path


def write_corrupt_video(path: Path, source: Path | None = None) -> Path:
    """A file named like a video that does not decode: garbage, or a real video's head only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    else:
        path.write_bytes(source.read_bytes()[:200])
    return path
