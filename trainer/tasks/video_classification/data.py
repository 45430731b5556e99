"""Reading a labelled video dataset: which segment of which video, which label, which split.

AutoML Video's CSV: ``[ML_USE,]path,label,start_seconds,end_seconds``, one row per labelled
segment, several segments per video. ``inf`` (or an absent end) means the end of the video; the
start is inclusive, the end exclusive. An absent start means 0.

Splits are decided per video, never per segment, so that clips of one video never land in two
splits:

- rows marked TRAIN, VALIDATE (or VALIDATION) or TEST keep their split;
- UNASSIGNED rows (or rows without ML_USE) go 80/20 to TRAIN/TEST by a stable hash of the video
  path as the CSV spells it (the image rule's hash, its VALIDATE share counted as TEST), unless the
  video's other rows all name one split: then they join it;
- the job also needs a validation split for early stopping. When no row is marked VALIDATE, it is
  carved from the training videos, again by video: a training video moves to VALIDATE when a
  second, independent hash of its path falls in the lowest ``validation_fraction`` (1/8 by default,
  so unassigned videos end up about 70/10/20). A video is not moved when that would leave one of
  its labels without training segments, and when the hash picks no video at all, the training video
  with the lowest hash is moved (if that is possible), so that small datasets still validate.
  Each video's fate depends only on its own path, so adding videos does not reshuffle others.

Bad rows (unparseable or negative numbers, start >= end), missing and unreadable videos, and
segments that start at or past a video's end are skipped, counted and reported with an example;
segment ends past a video's end are clipped to it. Video durations are read with PyAV; nothing
here imports torch, so the config checks and the management CLI stay fast.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from PIL import Image

from trainer.data.dataset_rows import (
    FileCheck,
    ImportRow,
    RowFailure,
    automl_split,
    csv_import_rows,
    no_classification_type,
    trainability,
)
from trainer.data.manifest import (
    ML_USE,
    SPLITS,
    TEST,
    TRAIN,
    VALIDATE,
    ManifestBase,
    check_trainable,
    checked_in_chunks,
    csv_rows,
    dataset_id,
    resolve_path,
    split_for,
    take_ml_use,
)
from trainer.errors import UserError
from trainer.store.automl import RpcCode
from trainer.store.resources import check_name

VALIDATION_FRACTION = 0.125
FALLBACK_FPS = 25.0  # when a stream records no frame rate at all
# Seconds: a frame stamped a hair before a boundary still counts as on it.
TIME_EPSILON = 1e-4
# Reasons a row is skipped, as reported.
BAD_ROW, MISSING, UNREADABLE, PAST_END = "bad_row", "missing_video", "unreadable_video", "past_end"
TOO_LARGE = "too_large_video"
MAX_FRAME_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # the limit PIL sets on an image


class VideoUnreadable(Exception):
    """A video that cannot be opened or decoded; the message says why."""


class VideoTooLarge(VideoUnreadable):
    """A video whose frames have more pixels than an image may (PIL's decompression-bomb limit):
    decoding a clip of them would take more memory than a machine has."""


@dataclass(frozen=True)
class Segment:
    path: Path  # where the video is on disk (or a URL PyAV can open)
    key: str  # the path as the dataset spells it: what the split hash and fingerprint use
    label: str
    start: float  # seconds, inclusive
    end: float  # seconds, exclusive, finite: `inf` and ends past the video are clipped to it
    split: str


@dataclass
class VideoManifest(ManifestBase):
    segments: list[Segment]
    labels: list[str]
    durations: dict[str, float] = field(default_factory=dict)  # video key -> seconds
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, str] = field(default_factory=dict)

    @property
    def items(self) -> list[Segment]:
        """The segments, under the name the image manifest uses, for code that serves both."""
        return self.segments

    def videos(self, split: str | None = None) -> list[str]:
        """The keys of the videos with segments in ``split`` (all splits when None)."""
        return sorted({s.key for s in self.segments if split is None or s.split == split})

    def fingerprint(self) -> str:
        """The datasetId: a digest of what was trained on (videos, segments, labels, splits)."""
        segments = sorted(self.segments, key=lambda s: (s.key, s.start, s.end, s.label))
        return dataset_id(
            f"{s.key}\t{s.label}\t{s.start:.6f}\t{s.end:.6f}\t{s.split}" for s in segments
        )


@dataclass(frozen=True)
class _Row:
    """A parsed CSV row; ``end`` may still be infinite and the split still UNASSIGNED."""

    path: Path
    key: str
    label: str
    start: float
    end: float
    ml_use: str
    where: str  # "file.csv:12", for reports


def parse_seconds(text: str, default: float) -> float:
    """A time offset in seconds: a number, ``inf``, or empty for ``default``. ValueError if bad."""
    text = text.strip()
    if not text:
        return default
    try:
        value = float(text.removesuffix("s"))  # "1.5s" as AutoML's JSON writes durations
    except ValueError:
        value = math.nan
    if math.isnan(value) or value < 0:
        raise ValueError(f"{text!r} is not a non-negative number of seconds (or inf)")
    return value


def unassigned_split(key: str) -> str:
    """80/20 TRAIN/TEST by the same stable hash that splits UNASSIGNED images 80/10/10."""
    return TRAIN if split_for(key) == TRAIN else TEST


def _validation_rank(key: str) -> float:
    # Independent of split_for's hash: every training video (bucket < 80 there) must be eligible.
    return int(hashlib.sha1(f"validate\0{key}".encode()).hexdigest()[:12], 16) / 16**12


def read_video_dataset(
    path: str | Path,
    check_workers: int = 4,
    validation_fraction: float = VALIDATION_FRACTION,
    check_files: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
) -> VideoManifest:
    """Read, check and split a video CSV; UserError when it cannot train a classifier.
    ``check_files=False`` reads the CSV alone, every video taken as readable to its stated end."""
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise UserError(
            f"dataset.path={str(path)!r} is not a file; give a CSV "
            "ML_USE,path,label,start_seconds,end_seconds"
        )
    manifest = VideoManifest(segments=[], labels=[])
    rows = _read_rows(csv_path, manifest)
    if check_files:
        rows = _clip_to_videos(rows, manifest, check_workers, should_stop)
    segments = _assign_splits(rows)
    if not any(s.split == VALIDATE for s in segments):
        segments = carve_validation(segments, validation_fraction)
    manifest.segments = sorted(segments, key=lambda s: (s.key, s.start, s.end, s.label))
    manifest.labels = sorted({s.label for s in manifest.segments})
    check_trainable(
        manifest, path, "segment", manifest.counts(), {s.label for s in manifest.split(TRAIN)},
        "a classifier needs at least two labels with readable videos",
    )  # fmt: skip
    return manifest


def _read_rows(csv_path: Path, manifest: VideoManifest) -> list[_Row]:
    rows: list[_Row] = []
    seen: set[tuple] = set()
    for line_no, cells in csv_rows(csv_path):
        where = f"{csv_path}:{line_no}"
        try:
            row = _parse_row(cells, csv_path.parent, where)
        except ValueError as problem:
            manifest.skip(BAD_ROW, f"{where}: {problem}")
            continue
        identity = (row.key, row.label, row.start, row.end)
        if identity not in seen:  # a repeated row is the same segment, not two
            seen.add(identity)
            rows.append(row)
    return rows


def _parse_row(cells: list[str], base: Path, where: str) -> _Row:
    ml_use, cells = take_ml_use(cells)
    if len(cells) < 2 or len(cells) > 4 or not cells[0] or not cells[1]:
        raise ValueError(
            f"expected [ML_USE,]path,label,start_seconds,end_seconds but got {','.join(cells)!r}"
        )
    key, label = cells[0], check_name("label", cells[1])
    cells += [""] * (4 - len(cells))
    start, end = parse_seconds(cells[2], 0.0), parse_seconds(cells[3], math.inf)
    if math.isinf(start):
        raise ValueError("start_seconds is inf; only the end may be")
    if start >= end:
        raise ValueError(f"start_seconds {start:g} is not before end_seconds {end:g}")
    return _Row(resolve_path(key, base), key, label, start, end, ml_use, where)


def _clip_to_videos(
    rows: list[_Row], manifest: VideoManifest, workers: int, should_stop: Callable[[], bool]
) -> list[_Row]:
    """Drop rows of unreadable videos and past their end; clip ends to the video's duration."""
    keys = sorted({row.key for row in rows})
    files = {row.key: row.path for row in rows}
    # PyAV releases the GIL while demuxing and decoding, so threads probe videos in parallel.
    found = checked_in_chunks(lambda k: _probe(files[k]), keys, workers, should_stop)
    probes = dict(zip(keys, found, strict=True))
    kept = []
    for row in rows:
        duration = probes[row.key]
        if isinstance(duration, str):
            manifest.skip(duration, str(row.path))
        elif row.start >= duration:
            manifest.skip(
                PAST_END, f"{row.where}: starts at {row.start:g}s, video ends at {duration:g}s"
            )
        else:
            manifest.durations[row.key] = duration
            kept.append(replace(row, end=min(row.end, duration)))
    return kept


def _probe(file: Path) -> float | str:
    """The video's duration in seconds, or the reason it is skipped."""
    if "://" not in str(file) and not file.is_file():
        return MISSING
    try:
        return video_duration(file)
    except VideoTooLarge:
        return TOO_LARGE
    except VideoUnreadable:
        return UNREADABLE


@dataclass(frozen=True)
class VideoInfo:
    duration: float  # seconds from the first frame to the end of the last
    fps: float


def probe_video(file: str | Path, opening: Mapping[str, Any] | None = None) -> VideoInfo:
    """Duration and frame rate; decodes one frame to prove the video can be decoded.
    ``opening``: av.open's keyword arguments (a prediction row's protocols and timeouts).

    Raises VideoUnreadable for a file that is not a decodable video.
    """
    try:
        with av.open(str(file), **(opening or {})) as container:
            if not container.streams.video:
                raise VideoUnreadable(f"{file} has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > MAX_FRAME_PIXELS:
                raise VideoTooLarge(f"{file}: frames of {width}x{height} pixels are too large")
            next(container.decode(stream))
            return VideoInfo(_stream_seconds(container, stream), stream_fps(stream))
    except (av.FFmpegError, StopIteration, OSError, ValueError) as problem:
        raise VideoUnreadable(f"{file}: {problem or 'no frame decodes'}") from problem


def frame_size(file: str | Path) -> tuple[int, int] | None:
    """(height, width) of a video's frames from its header, or None for a file without one."""
    try:
        with av.open(str(file)) as container:
            stream = container.streams.video[0]
            return stream.codec_context.height, stream.codec_context.width
    except (av.FFmpegError, IndexError, OSError, ValueError):
        return None


def video_duration(file: str | Path) -> float:
    return probe_video(file).duration


def stream_fps(stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else FALLBACK_FPS


def stream_offset(stream: av.VideoStream) -> float:
    """The first frame's timestamp in seconds: times in a dataset count from the first frame."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def seek_seconds(container: av.container.InputContainer, stream: av.VideoStream, at: float) -> None:
    """Seek to the last keyframe at or before ``at`` seconds from the first frame."""
    time_base = stream.time_base or Fraction(1, av.time_base)
    target = math.floor((at + stream_offset(stream)) / time_base)
    container.seek(max(0, target), stream=stream, backward=True)


def _stream_seconds(container: av.container.InputContainer, stream: av.VideoStream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    # Some containers (raw streams, some WebM) record no duration: find the last packet's end.
    last = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            last = max(last, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    return last - stream_offset(stream)


def _assign_splits(rows: list[_Row]) -> list[Segment]:
    named: dict[str, set[str]] = {}
    for row in rows:
        if row.ml_use in ML_USE:
            named.setdefault(row.key, set()).add(ML_USE[row.ml_use])
    segments = []
    for row in rows:
        split = ML_USE.get(row.ml_use)
        if split is None:
            # An UNASSIGNED row of a video whose other rows all name one split joins it, so the
            # video stays whole; otherwise the video's hash decides.
            others = named.get(row.key, set())
            split = next(iter(others)) if len(others) == 1 else unassigned_split(row.key)
        segments.append(Segment(row.path, row.key, row.label, row.start, row.end, split))
    return segments


def carve_validation(segments: list[Segment], fraction: float) -> list[Segment]:
    """Move whole training videos to VALIDATE by a hash of their path (module docstring)."""
    train_videos = sorted({s.key for s in segments if s.split == TRAIN}, key=_validation_rank)
    training_left = Counter(s.label for s in segments if s.split == TRAIN)
    chosen = [key for key in train_videos if _validation_rank(key) < fraction]
    if not chosen and len(train_videos) > 1:
        chosen = train_videos[:1]
    moved: set[str] = set()
    for key in chosen:
        labels = Counter(s.label for s in segments if s.key == key and s.split == TRAIN)
        if all(training_left[label] > n for label, n in labels.items()):
            training_left.subtract(labels)
            moved.add(key)
    return [
        replace(s, split=VALIDATE) if s.key in moved and s.split == TRAIN else s for s in segments
    ]


def describe(manifest: VideoManifest) -> str:
    counts = manifest.counts()
    videos = {split: len(manifest.videos(split)) for split in SPLITS}
    text = (
        f"{len(manifest.segments)} segments of {len(manifest.videos())} videos, "
        f"{len(manifest.labels)} labels (train {counts[TRAIN]} in {videos[TRAIN]} videos, "
        f"validate {counts[VALIDATE]} in {videos[VALIDATE]}, test {counts[TEST]} in {videos[TEST]})"
    )
    return text + manifest.skipped_summary("segments")


# -- importing into a dataset (trainer/data/dataset_rows.py) -----------------------------------


class VideoFormat:
    """AutoML Video's CSV as a dataset import reads it: each segment row on its own, its video
    probed as a training probes it, a segment that starts past the video's end refused."""

    metadata_key = "videoClassificationDatasetMetadata"
    unit = "video"

    def metadata(self, classification_type: str | None) -> dict[str, Any]:
        return no_classification_type(classification_type, "a video classification dataset")

    def read(self, source: Path, metadata: dict[str, Any]) -> Iterator[ImportRow | RowFailure]:
        if not source.is_file():
            problem = "is not a file; give a CSV ML_USE,path,label,start_seconds,end_seconds"
            yield RowFailure(RpcCode.INVALID_ARGUMENT, str(source), problem)
            return
        yield from csv_import_rows(source, _import_row)

    def check_file(self, path: Path) -> FileCheck:
        found = _probe(path)
        return FileCheck(found) if isinstance(found, str) else FileCheck(facts={"duration": found})

    def row_problem(self, row: ImportRow, facts: dict[str, Any]) -> str | None:
        start, duration = float(row.rest[1]), facts["duration"]
        if start >= duration:
            return f"the segment starts at {start:g}s, the video ends at {duration:g}s"
        return None

    def trainable(self, rows_csv: Path, metadata: dict[str, Any]) -> str | None:
        return trainability(lambda path: read_video_dataset(path, check_files=False), rows_csv)


def _import_row(cells: list[str], base: Path, where: str) -> ImportRow:
    row = _parse_row(cells, base, where)
    path = Path(os.path.abspath(row.path))
    rest = (row.label, repr(row.start), "inf" if math.isinf(row.end) else repr(row.end))
    identity = "\t".join([str(path), *rest])  # the reader's: video, label, start and end
    return ImportRow(automl_split(row.ml_use), path, rest, (row.label,), identity)


DATASET_FORMAT = VideoFormat()
