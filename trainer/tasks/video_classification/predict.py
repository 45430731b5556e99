"""Batch prediction for video classification, as AutoML Video writes it.

Input: a CSV with rows ``path,start_seconds,end_seconds`` (``inf`` or an absent end: the end of
the video; an absent start: 0). Relative paths are relative to the CSV's folder; ``file:`` URLs
name local files, and http and https URLs are read with ``--allow-remote`` only, FFmpeg limited to
the protocols each needs and every read given a timeout (trainer/data/prediction_inputs.py).

Output, in the folder given: ``video_classification.csv`` with one row per input row, in input
order, ``path,start,end,json_file,status`` (path, start and end as the input spelled them; status
``OK``, or an error code and message such as ``NOT_FOUND: ...``; a failed row has no JSON file),
and per successful row ``video_classification_<row number>.json``: a list of AnnotationPayload
objects, AutoML's field names, sorted by type, then start time, then score (best first)::

    {"annotationSpecId": "2", "displayName": "up",
     "videoClassification": {"type": "segment",
                             "classificationAnnotation": {"score": 0.93},
                             "timeSegment": {"startTimeOffset": "0s", "endTimeOffset": "3s"}}}

Three kinds of annotation, each a flag (AutoML's ``params``):

- ``segment`` (``segment_classification``, on by default): the whole requested time segment;
- ``shot`` (``shot_classification``): each shot of it, shots cut where the colour histograms of two
  consecutive frames differ by more than ``shot_threshold`` (half the L1 distance of 16-bin
  per-channel histograms of 32 x 32 thumbnails, in [0, 1]), no shot shorter than
  ``min_shot_seconds``;
- ``1s_interval`` (``1s_interval_classification``): every second of it, the last one possibly
  shorter.

A time window is classified by the mean of the model's probabilities over up to
``max_clips_per_window`` clips at fixed positions in it (as evaluation places them); a label is
annotated when its score reaches ``score_threshold`` (AutoML's default 0.5). Offsets are seconds
from the video's first frame, written as protobuf JSON Durations (``"1.500s"``).

The model is a callable from a clip batch (N, C, T, H, W) to probabilities (N, labels), so this
module runs without a trained model. Clips are decoded in DataLoader worker processes.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.data.prediction import add_status, input_text, spreadsheet_safe
from trainer.data.prediction_inputs import (
    LOCAL_ONLY,
    VIDEO_SCHEMES,
    Refused,
    SourcePolicy,
    checked_source,
    ffmpeg_open_arguments,
    is_timeout,
)
from trainer.errors import UserError
from trainer.store.resources import write_json_atomic
from trainer.tasks.video_classification.clips import (
    ClipSpec,
    VideoDecodeError,
    clip_positions,
    decode_clip,
)
from trainer.tasks.video_classification.data import (
    TIME_EPSILON,
    VideoUnreadable,
    parse_seconds,
    probe_video,
    seek_seconds,
    stream_offset,
)

SEGMENT, SHOT, ONE_SECOND = "segment", "shot", "1s_interval"
CSV_NAME = "video_classification.csv"
MAX_ONE_SECOND_WINDOWS = 3 * 3600  # a row of a three-hour video, at most
ProbabilityFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass(frozen=True)
class PredictOptions:
    """AutoML Video's batch-prediction params, plus how windows are sampled."""

    segment_classification: bool = True
    shot_classification: bool = False
    one_second_interval_classification: bool = False
    score_threshold: float = 0.5
    max_clips_per_window: int = 4
    shot_threshold: float = 0.4
    min_shot_seconds: float = 0.5
    batch_size: int = 16  # clips per call of the model

    def kinds(self) -> list[str]:
        flags = {
            SEGMENT: self.segment_classification,
            SHOT: self.shot_classification,
            ONE_SECOND: self.one_second_interval_classification,
        }
        return [kind for kind, wanted in flags.items() if wanted]


@dataclass(frozen=True)
class PredictionRow:
    path: str  # the three cells as the input spelled them: echoed in the output CSV
    start: str
    end: str
    problem: str = ""  # a malformed row: its status


@dataclass(frozen=True)
class Window:
    row: int
    kind: str
    start: float
    end: float
    clips: int


@dataclass
class RowPlan:
    windows: list[Window] = field(default_factory=list)
    status: str = "OK"
    source: str = ""  # what FFmpeg opens: a checked local file or URL
    opening: dict[str, Any] = field(default_factory=dict)  # av.open's protocols and timeouts


@dataclass
class VideoPredictionResult:
    folder: Path
    csv_path: Path
    predicted: int  # rows with status OK
    failed: int
    json_files: list[Path]
    seconds: float
    partial_failures: list[dict[str, Any]]  # the first failed rows, as google.rpc.Status


# -- input ----------------------------------------------------------------------------------


def read_prediction_csv(path: Path) -> list[PredictionRow]:
    """The rows of a batch-prediction CSV; a malformed row becomes a row with a problem, so the
    output still matches the input line for line."""
    rows = []
    reader = csv.reader(io.StringIO(input_text(path)))
    try:
        for cells in reader:
            cells = [cell.strip() for cell in cells]
            if not any(cells):
                continue
            padded = cells + [""] * (3 - len(cells))
            problem = ""
            if len(cells) > 3 or not cells[0]:
                problem = f"expected path,start_seconds,end_seconds, got {','.join(cells)!r}"
            rows.append(PredictionRow(padded[0], padded[1], padded[2], problem))
    except csv.Error as error:
        raise UserError(
            f"--input {path}, line {reader.line_num}: not a CSV row ({error})"
        ) from None
    if not rows:
        raise UserError(f"--input {path} lists no videos")
    return rows


def _row_times(row: PredictionRow) -> tuple[float, float]:
    try:
        start, end = parse_seconds(row.start, 0.0), parse_seconds(row.end, math.inf)
    except ValueError as problem:
        raise _RowError("INVALID_ARGUMENT", str(problem)) from None
    if math.isinf(start) or start >= end:
        raise _RowError("INVALID_ARGUMENT", f"start {row.start!r} is not before end {row.end!r}")
    return start, end


class _RowError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")


# -- planning: which windows of which video ----------------------------------------------------


def plan_row(
    row_index: int,
    row: PredictionRow,
    base: Path,
    spec: ClipSpec,
    options: PredictOptions,
    sources: SourcePolicy = LOCAL_ONLY,
) -> RowPlan:
    """The time windows to classify for one input row, or the status saying why there are none."""
    try:
        if row.problem:
            raise _RowError("INVALID_ARGUMENT", row.problem)
        start, end = _row_times(row)
        source, opening = _video_source(row.path, base, sources)
        duration, fps = _probe(source, row.path, opening)
        if start >= duration:
            raise _RowError(
                "INVALID_ARGUMENT",
                f"start {start:g}s is at or past the video's end ({duration:g}s)",
            )
        end = min(end, duration)
        clip_seconds = spec.span_frames() / fps
        windows = []
        for kind in options.kinds():
            for a, b in _kind_windows(kind, source, start, end, options, opening):
                count = max(1, min(options.max_clips_per_window, int((b - a) // clip_seconds)))
                windows.append(Window(row_index, kind, a, b, count))
        return RowPlan(windows, source=source, opening=opening)
    except _RowError as problem:
        return RowPlan(status=str(problem))
    except (VideoDecodeError, VideoUnreadable, av.FFmpegError, OSError, ValueError) as problem:
        # Whatever else one odd file raises fails its row, never the job.
        return RowPlan(status=f"{_code_of(problem)}: {row.path}: {problem}")


def _video_source(path: str, base: Path, sources: SourcePolicy) -> tuple[str, dict[str, Any]]:
    """The checked file or URL FFmpeg opens for a row, and av.open's arguments for it."""
    try:
        source = checked_source(path, base, sources, VIDEO_SCHEMES)
    except Refused as refused:
        raise _RowError(refused.code.name, str(refused)) from None
    except FileNotFoundError:
        raise _RowError("NOT_FOUND", f"{path}: no such file") from None
    return str(source), ffmpeg_open_arguments(source, sources)


def _probe(source: str, shown: str, opening: dict[str, Any]) -> tuple[float, float]:
    try:
        info = probe_video(source, opening)
    except VideoUnreadable as problem:
        if is_timeout(problem):
            waited = f"{opening['timeout'][0]:g} s"
            raise _RowError("DEADLINE_EXCEEDED", f"{shown}: no answer within {waited}") from None
        raise _RowError("INVALID_ARGUMENT", f"cannot decode {shown}: {problem}") from None
    return info.duration, info.fps


def _code_of(problem: BaseException) -> str:
    """DEADLINE_EXCEEDED for a remote read that waited too long, else INVALID_ARGUMENT."""
    return "DEADLINE_EXCEEDED" if is_timeout(problem) else "INVALID_ARGUMENT"


def _kind_windows(
    kind: str,
    source: str,
    start: float,
    end: float,
    options: PredictOptions,
    opening: Mapping[str, Any] | None = None,
) -> list[tuple[float, float]]:
    if kind == SEGMENT:
        return [(start, end)]
    if kind == ONE_SECOND:
        count = math.ceil(round(end - start, 6))
        if count > MAX_ONE_SECOND_WINDOWS:  # a header may claim days: the list is bounded first
            raise _RowError(
                "INVALID_ARGUMENT",
                f"{count} one-second windows from {start:g}s to {end:g}s, more than "
                f"{MAX_ONE_SECOND_WINDOWS} a row; split the row into shorter segments",
            )
        return one_second_windows(start, end)
    try:
        return detect_shots(
            source, start, end, options.shot_threshold, options.min_shot_seconds, opening
        )
    except VideoDecodeError as problem:
        raise _RowError(_code_of(problem), str(problem)) from None


def one_second_windows(start: float, end: float) -> list[tuple[float, float]]:
    count = max(1, math.ceil(round(end - start, 6)))
    return [(start + i, min(start + i + 1, end)) for i in range(count) if start + i < end]


def detect_shots(
    path: str | Path,
    start: float,
    end: float,
    threshold: float = 0.4,
    min_shot_seconds: float = 0.5,
    opening: Mapping[str, Any] | None = None,
) -> list[tuple[float, float]]:
    """Shots of ``[start, end)`` as (start, end) pairs covering it: a cut where two consecutive
    frames' colour histograms differ by more than ``threshold`` (see the module docstring)."""
    times, distances = frame_changes(path, start, end, opening)
    cuts, last = [], start
    for moment, distance in zip(times, distances, strict=True):
        if distance > threshold and moment - last >= min_shot_seconds:
            cuts.append(moment)
            last = moment
    if cuts and end - cuts[-1] < min_shot_seconds:
        cuts.pop()  # a sliver at the end joins the shot before it
    bounds = [start, *cuts, end]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def frame_changes(
    path: str | Path, start: float, end: float, opening: Mapping[str, Any] | None = None
) -> tuple[list[float], list[float]]:
    """For each frame of ``[start, end)`` after the first: its time, and the histogram distance
    in [0, 1] to the frame before it (``opening``: av.open's keyword arguments)."""
    times: list[float] = []
    distances: list[float] = []
    previous = None
    try:
        with av.open(str(path), **(opening or {})) as container:
            stream = container.streams.video[0]
            offset = stream_offset(stream)
            seek_seconds(container, stream, start)
            for frame in container.decode(stream):
                moment = (frame.time or 0.0) - offset
                if moment < start - TIME_EPSILON:
                    continue
                if moment >= end - TIME_EPSILON:
                    break
                histogram = _histogram(frame.to_ndarray(format="rgb24", width=32, height=32))
                if previous is not None:
                    times.append(moment)
                    distances.append(float(np.abs(histogram - previous).sum()) / 2)
                previous = histogram
    except (av.FFmpegError, OSError, IndexError) as problem:
        raise VideoDecodeError(f"{path}: {problem}") from problem
    return times, distances


def _histogram(thumbnail: np.ndarray) -> np.ndarray:
    """16-bin histograms of R, G and B, each summing to 1/3: the whole sums to 1."""
    bins = (thumbnail.reshape(-1, 3) // 16).astype(np.int64) + np.arange(3) * 16
    counts = np.bincount(bins.ravel(), minlength=48).astype(np.float64)
    return counts / counts.sum()


# -- decoding and classifying windows -----------------------------------------------------------


class WindowClips(Dataset):
    """Item: (window index, its clips (k, C, T, H, W)) or (window index, the error message)."""

    def __init__(self, windows: Sequence[Window], plans: Sequence[RowPlan], spec: ClipSpec) -> None:
        self.windows, self.spec = list(windows), spec
        # Each row's source and av.open arguments (a worker process gets only these).
        self.sources = [(plan.source, plan.opening) for plan in plans]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | str]:
        window = self.windows[index]
        source, opening = self.sources[window.row]
        try:
            clips = [
                decode_clip(source, window.start, window.end, self.spec, where, opening)
                for where in clip_positions(window.clips)
            ]
        except VideoDecodeError as problem:
            return index, f"{_code_of(problem)}: {problem}"
        return index, torch.stack(clips)


def _window_scores(
    loader: DataLoader, probabilities: ProbabilityFn, batch_size: int
) -> Iterator[tuple[int, np.ndarray | str]]:
    """(window index, mean probabilities over its clips, or its error), in window order."""
    for batch in loader:
        good = [(index, clips) for index, clips in batch if not isinstance(clips, str)]
        scores = _classify([clips for _, clips in good], probabilities, batch_size)
        by_index = {index: row for (index, _), row in zip(good, scores, strict=True)}
        for index, clips in batch:
            yield index, clips if isinstance(clips, str) else by_index[index]


def _classify(
    stacks: list[torch.Tensor], probabilities: ProbabilityFn, batch_size: int
) -> list[np.ndarray]:
    if not stacks:
        return []
    clips = torch.cat(stacks)
    with torch.inference_mode():
        parts = [
            np.asarray(torch.as_tensor(probabilities(clips[i : i + batch_size])).float().cpu())
            for i in range(0, len(clips), batch_size)
        ]
    flat = np.concatenate(parts)
    bounds = np.cumsum([0] + [len(stack) for stack in stacks])
    return [flat[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# -- output -------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """Protobuf JSON's Duration: whole seconds, or 3, 6 or 9 decimals, then ``s``."""
    nanos = round(seconds * 1e9)
    whole, fraction = divmod(nanos, 10**9)
    if fraction == 0:
        return f"{whole}s"
    for digits in (3, 6, 9):
        scale = 10 ** (9 - digits)
        if fraction % scale == 0:
            return f"{whole}.{fraction // scale:0{digits}d}s"
    raise AssertionError("unreachable: 9 digits always divide")


def window_annotations(
    window: Window, scores: np.ndarray, labels: Sequence[str], threshold: float
) -> list[dict[str, Any]]:
    """AnnotationPayloads for the labels of one window scoring at least ``threshold``."""
    scores = np.round(np.asarray(scores, dtype=np.float64), 6)  # no float32 noise in the JSON
    segment = {
        "startTimeOffset": format_duration(window.start),
        "endTimeOffset": format_duration(window.end),
    }
    return [
        {
            "annotationSpecId": str(index),
            "displayName": labels[index],
            "videoClassification": {
                "type": window.kind,
                "classificationAnnotation": {"score": float(scores[index])},
                "timeSegment": segment,
            },
        }
        for index in np.argsort(-scores, kind="stable")
        if scores[index] >= threshold
    ]


def _sort_key(annotation: dict[str, Any]) -> tuple:
    video = annotation["videoClassification"]
    start = float(video["timeSegment"]["startTimeOffset"].removesuffix("s"))
    return video["type"], start, -video["classificationAnnotation"]["score"]


def _write_json(path: Path, annotations: list[dict[str, Any]]) -> None:
    write_json_atomic(path, sorted(annotations, key=_sort_key), indent=1)


# -- the job ------------------------------------------------------------------------------------


def predict_videos(
    rows: Sequence[PredictionRow],
    base: Path,
    probabilities: ProbabilityFn,
    labels: Sequence[str],
    spec: ClipSpec,
    folder: Path,
    options: PredictOptions = PredictOptions(),
    workers: int = 0,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    sources: SourcePolicy = LOCAL_ONLY,
) -> VideoPredictionResult:
    """Classify every row's windows; write the JSON files and ``video_classification.csv``.
    ``sources``: what a row may name (local files only, by default).

    Raises UserError (after writing the CSV) when every row failed.
    """
    if not options.kinds():
        raise UserError("no classification type requested; turn on at least one of them")
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PyAV decodes without the GIL
        plans = list(
            pool.map(lambda i: plan_row(i, rows[i], base, spec, options, sources), range(len(rows)))
        )
    windows = [window for plan in plans for window in plan.windows]
    writer = _RowWriter(folder, rows, plans, labels, options.score_threshold, on_progress)
    loader = DataLoader(
        WindowClips(windows, plans, spec),
        batch_size=max(1, options.batch_size // options.max_clips_per_window),
        num_workers=workers,
        collate_fn=list,
    )
    try:
        writer.flush_ready()
        for index, outcome in _window_scores(loader, probabilities, options.batch_size):
            writer.add(windows[index], outcome)
    finally:
        writer.close()
    if writer.ok == 0:
        raise UserError(
            f"every one of the {len(rows)} videos failed (first: {writer.first_error}); "
            f"see {writer.csv_path}"
        )
    return VideoPredictionResult(
        folder, writer.csv_path, writer.ok, len(rows) - writer.ok, writer.json_files,
        time.monotonic() - started, writer.failures,
    )  # fmt: skip


class _RowWriter:
    """Collects window results and writes each row, in input order, once its windows are in."""

    def __init__(
        self,
        folder: Path,
        rows: Sequence[PredictionRow],
        plans: Sequence[RowPlan],
        labels: Sequence[str],
        threshold: float,
        on_progress: Callable[[int, int], None],
    ) -> None:
        self.folder, self.rows, self.plans = folder, rows, plans
        self.labels, self.threshold, self.on_progress = labels, threshold, on_progress
        self.waiting = [len(plan.windows) for plan in plans]
        self.annotations: list[list[dict[str, Any]]] = [[] for _ in rows]
        self.next_row = 0
        self.ok = 0
        self.first_error = ""
        self.failures: list[dict[str, Any]] = []
        self.json_files: list[Path] = []
        self.csv_path = folder / CSV_NAME
        self._out = self.csv_path.open("w", newline="", encoding="utf-8")
        self._csv = csv.writer(self._out)

    def add(self, window: Window, outcome: np.ndarray | str) -> None:
        plan = self.plans[window.row]
        if isinstance(outcome, str):
            if plan.status == "OK":
                plan.status = outcome
        else:
            annotations = window_annotations(window, outcome, self.labels, self.threshold)
            self.annotations[window.row] += annotations
        self.waiting[window.row] -= 1
        self.flush_ready()

    def flush_ready(self) -> None:
        while self.next_row < len(self.rows) and self.waiting[self.next_row] == 0:
            self._write_row(self.next_row)
            self.next_row += 1
            self.on_progress(self.next_row, len(self.rows))
        self._out.flush()

    def _write_row(self, index: int) -> None:
        row, status = self.rows[index], self.plans[index].status
        name = ""
        if status == "OK":
            name = f"video_classification_{index + 1}.json"
            _write_json(self.folder / name, self.annotations[index])
            self.json_files.append(self.folder / name)
            self.ok += 1
        else:
            self.first_error = self.first_error or status
            add_status(self.failures, row.path, status)
        cells = [row.path, row.start, row.end, name, status]
        self._csv.writerow([spreadsheet_safe(cell) for cell in cells])
        self.annotations[index] = []  # done with: a long job keeps only pending rows

    def close(self) -> None:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
