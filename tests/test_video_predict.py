"""Batch prediction for videos: the three kinds of annotation, the output files, the statuses of
rows that fail, and the shot detector; the model is a fake callable."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.video_helpers import write_corrupt_video, write_ramp_video
from trainer.errors import UserError
from trainer.tasks.video_classification.clips import ClipSpec
from trainer.tasks.video_classification.demo import write_moving_videos
from trainer.tasks.video_classification.predict import (
    CSV_NAME,
    PredictOptions,
    detect_shots,
    format_duration,
    frame_changes,
    one_second_windows,
    predict_videos,
    read_prediction_csv,
)

LABELS = ["dark", "bright", "other"]
RAW = ClipSpec(4, 2, (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # pixels stay in [0, 1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a ramp (20 frames at 10 fps, frame i grey 8 * i), generated moving-shape
    videos (2 s at 8 fps; two_segments_0000.mp4 cuts to a new scene at 1 s) and a corrupt one."""
    folder = tmp_path_factory.mktemp("videos")
    write_ramp_video(folder / "ramp.mp4", frames=20, fps=10)
    write_moving_videos(folder, per_label=1, size=32, fps=8, seconds=2.0, two_segment_videos=1)
    write_corrupt_video(folder / "corrupt.mp4")
    return folder


class BrightnessModel:
    """A fake model: 'bright' when a clip's mean grey passes 0.3, else 'dark' (0.9 vs 0.1);
    it records the batches it was called with."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        self.batches.append(tuple(clips.shape))
        bright = (clips.mean(dim=(1, 2, 3, 4)) > 0.3).float()
        return torch.stack([0.9 - 0.8 * bright, 0.1 + 0.8 * bright, torch.zeros_like(bright)], 1)


def constant_model(clips: torch.Tensor) -> np.ndarray:
    return np.tile([0.2, 0.7, 0.1], (len(clips), 1))


def run(
    folder: Path, lines: str, model, options: PredictOptions, workers: int = 0
) -> tuple[list[list[str]], list[list[dict]]]:
    """Predict the CSV ``lines`` (paths relative to ``folder``); the output rows and JSONs."""
    source = folder / f"input_{abs(hash(lines))}.csv"
    source.write_text(lines)
    out = source.with_suffix("")
    predict_videos(read_prediction_csv(source), folder, model, LABELS, RAW, out, options, workers)
    with (out / CSV_NAME).open(newline="") as handle:
        rows = list(csv.reader(handle))
    payloads = [json.loads((out / row[3]).read_text()) if row[3] else [] for row in rows]
    return rows, payloads


def summary(payloads: list[dict]) -> list[tuple]:
    """(type, start, end, label, score) per annotation, in file order."""
    return [
        (
            a["videoClassification"]["type"],
            a["videoClassification"]["timeSegment"]["startTimeOffset"],
            a["videoClassification"]["timeSegment"]["endTimeOffset"],
            a["displayName"],
            a["videoClassification"]["classificationAnnotation"]["score"],
        )
        for a in payloads
    ]


def test_segment_classification_is_on_by_default_and_shaped_like_automl(videos: Path) -> None:
    rows, payloads = run(videos, "ramp.mp4,0,inf\n", constant_model, PredictOptions())
    assert rows == [["ramp.mp4", "0", "inf", "video_classification_1.json", "OK"]]
    assert payloads[0] == [
        {
            "annotationSpecId": "1",
            "displayName": "bright",
            "videoClassification": {
                "type": "segment",
                "classificationAnnotation": {"score": 0.7},
                "timeSegment": {"startTimeOffset": "0s", "endTimeOffset": "2s"},
            },
        }
    ]
    # The threshold keeps every label at or above it, best first.
    _, payloads = run(
        videos, "ramp.mp4,0.5,1.5\n", constant_model, PredictOptions(score_threshold=0)
    )
    assert summary(payloads[0]) == [
        ("segment", "0.500s", "1.500s", "bright", 0.7),
        ("segment", "0.500s", "1.500s", "dark", 0.2),
        ("segment", "0.500s", "1.500s", "other", 0.1),
    ]


def test_one_second_intervals_classify_what_each_second_shows(videos: Path) -> None:
    model = BrightnessModel()
    options = PredictOptions(segment_classification=False, one_second_interval_classification=True)
    rows, payloads = run(videos, "ramp.mp4,0,inf\nramp.mp4,0.5,\n", model, options)
    # The ramp's first second is dark, its second one bright; windows follow the row's start.
    assert summary(payloads[0]) == [
        ("1s_interval", "0s", "1s", "dark", 0.9),
        ("1s_interval", "1s", "2s", "bright", 0.9),
    ]
    assert [s[:3] for s in summary(payloads[1])] == [
        ("1s_interval", "0.500s", "1.500s"),
        ("1s_interval", "1.500s", "2s"),
    ]
    assert [row[4] for row in rows] == ["OK", "OK"]
    assert all(shape[1:] == (3, 4, 32, 32) for shape in model.batches)


def test_a_segment_is_scored_by_the_mean_over_its_clips(videos: Path) -> None:
    # 2 s hold two clips of 0.7 s: one in the dark half, one in the bright half.
    _, payloads = run(videos, "ramp.mp4,0,2\n", BrightnessModel(), PredictOptions())
    assert summary(payloads[0]) == [
        ("segment", "0s", "2s", "dark", 0.5),
        ("segment", "0s", "2s", "bright", 0.5),
    ]
    one_clip = PredictOptions(max_clips_per_window=1)
    _, payloads = run(videos, "ramp.mp4,0,2\n", BrightnessModel(), one_clip)
    assert summary(payloads[0]) == [("segment", "0s", "2s", "bright", 0.9)]  # the centre only


def test_shot_classification_follows_the_cut(videos: Path) -> None:
    options = PredictOptions(
        segment_classification=False, shot_classification=True, score_threshold=0.5
    )
    lines = "videos/two_segments_0000.mp4,0,inf\nvideos/left_0000.mp4,0,inf\n"
    _, payloads = run(videos, lines, constant_model, options)
    assert [s[:3] for s in summary(payloads[0])] == [("shot", "0s", "1s"), ("shot", "1s", "2s")]
    assert [s[:3] for s in summary(payloads[1])] == [("shot", "0s", "2s")]


def test_all_three_kinds_together_sorted_by_type_then_time(videos: Path) -> None:
    options = PredictOptions(shot_classification=True, one_second_interval_classification=True)
    lines = "videos/two_segments_0000.mp4,0.5,inf\n"
    rows, payloads = run(videos, lines, constant_model, options, workers=1)
    assert rows[0][4] == "OK"
    assert [s[:3] for s in summary(payloads[0])] == [
        ("1s_interval", "0.500s", "1.500s"),
        ("1s_interval", "1.500s", "2s"),
        ("segment", "0.500s", "2s"),
        ("shot", "0.500s", "1s"),
        ("shot", "1s", "2s"),
    ]


def test_failed_rows_get_a_status_and_the_output_matches_the_input_line_for_line(
    videos: Path,
) -> None:
    lines = (
        "ramp.mp4,0,1\n"
        "missing.mp4,0,inf\n"
        "corrupt.mp4,0,inf\n"
        "ramp.mp4,abc,1\n"
        "ramp.mp4,1,1\n"
        "ramp.mp4,2,inf\n"  # starts at the end of the 2-second video
        "ramp.mp4,0,1,extra\n"
        "\n"
        "ramp.mp4\n"  # no times: the whole video
    )
    rows, payloads = run(videos, lines, constant_model, PredictOptions())
    assert [row[:3] for row in rows] == [
        ["ramp.mp4", "0", "1"],
        ["missing.mp4", "0", "inf"],
        ["corrupt.mp4", "0", "inf"],
        ["ramp.mp4", "abc", "1"],
        ["ramp.mp4", "1", "1"],
        ["ramp.mp4", "2", "inf"],
        ["ramp.mp4", "0", "1"],
        ["ramp.mp4", "", ""],
    ]
    statuses = [row[4] for row in rows]
    assert statuses[0] == statuses[7] == "OK"
    assert statuses[1] == "NOT_FOUND: missing.mp4: no such file"
    assert statuses[2].startswith("INVALID_ARGUMENT: cannot decode corrupt.mp4")
    assert statuses[3].startswith("INVALID_ARGUMENT: 'abc' is not")
    assert statuses[4] == "INVALID_ARGUMENT: start '1' is not before end '1'"
    assert "at or past the video's end (2s)" in statuses[5]
    assert statuses[6].startswith("INVALID_ARGUMENT: expected path,start_seconds,end_seconds")
    assert [row[3] for row in rows] == [
        "video_classification_1.json", "", "", "", "", "", "", "video_classification_8.json"
    ]  # fmt: skip
    assert summary(payloads[7])[0][:3] == ("segment", "0s", "2s")


def test_a_job_where_every_row_fails_is_an_error_with_its_statuses_written(
    videos: Path, tmp_path: Path
) -> None:
    source = tmp_path / "input.csv"
    source.write_text("missing.mp4,0,1\ncorrupt.mp4,0,1\n")
    with pytest.raises(UserError, match="every one of the 2 videos failed.*NOT_FOUND"):
        predict_videos(
            read_prediction_csv(source), videos, constant_model, LABELS, RAW, tmp_path / "out"
        )
    assert len((tmp_path / "out" / CSV_NAME).read_text().splitlines()) == 2
    with pytest.raises(UserError, match="lists no videos"):
        source.write_text("\n")
        read_prediction_csv(source)
    with pytest.raises(UserError, match="no such file"):
        read_prediction_csv(tmp_path / "absent.csv")
    with pytest.raises(UserError, match="no classification type"):
        none = PredictOptions(segment_classification=False)
        predict_videos([], videos, constant_model, LABELS, RAW, tmp_path / "none", none)


def test_shot_detector_finds_the_known_cut(videos: Path) -> None:
    cut_video = videos / "videos" / "two_segments_0000.mp4"
    times, distances = frame_changes(cut_video, 0.0, 2.0)
    assert len(times) == 15 and times[7] == pytest.approx(1.0)
    # The cut stands far above the motion of the shape: a wide margin for the threshold.
    assert distances[7] > 0.6 and max(distances[:7] + distances[8:]) < 0.15
    assert detect_shots(cut_video, 0.0, 2.0) == [(0.0, 1.0), (1.0, 2.0)]
    assert detect_shots(cut_video, 0.5, 2.0) == [(0.5, 1.0), (1.0, 2.0)]
    assert detect_shots(cut_video, 1.25, 2.0) == [(1.25, 2.0)]
    # No shot is shorter than min_shot_seconds: a cut too close to either end is not one.
    assert detect_shots(cut_video, 0.0, 2.0, min_shot_seconds=1.5) == [(0.0, 2.0)]
    assert detect_shots(cut_video, 0.25, 1.25) == [(0.25, 1.25)]
    assert detect_shots(videos / "videos" / "up_0000.mp4", 0.0, 2.0) == [(0.0, 2.0)]


def test_windows_and_durations() -> None:
    assert one_second_windows(0.0, 2.5) == [(0.0, 1.0), (1.0, 2.0), (2.0, 2.5)]
    assert one_second_windows(0.5, 3.0) == [(0.5, 1.5), (1.5, 2.5), (2.5, 3.0)]
    assert one_second_windows(1.0, 1.4) == [(1.0, 1.4)]
    assert one_second_windows(0.0, 2.0000001) == [(0.0, 1.0), (1.0, 2.0)]
    assert format_duration(0) == "0s"
    assert format_duration(3.0) == "3s"
    assert format_duration(1.5) == "1.500s"
    assert format_duration(0.125) == "0.125s"
    assert format_duration(2.0000005) == "2.000000500s"
    assert format_duration(1 / 3) == "0.333333333s"


def test_relative_paths_resolve_against_the_csv_folder(videos: Path, tmp_path: Path) -> None:
    shutil.copy(videos / "ramp.mp4", tmp_path / "here.mp4")
    rows, _ = run(
        tmp_path, f"here.mp4\n{videos / 'ramp.mp4'},0,1\n", constant_model, PredictOptions()
    )
    assert [row[4] for row in rows] == ["OK", "OK"]
