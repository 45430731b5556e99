"""Reading video datasets: AutoML's video CSV, splits by video, bad rows, unreadable videos, and
the generated demo videos."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import av
import pytest

from tests.video_helpers import write_corrupt_video, write_ramp_video
from trainer.data.manifest import TEST, TRAIN, VALIDATE, split_for
from trainer.errors import UserError
from trainer.tasks.video_classification.data import (
    BAD_ROW,
    MISSING,
    PAST_END,
    UNREADABLE,
    Segment,
    _validation_rank,
    carve_validation,
    describe,
    parse_seconds,
    probe_video,
    read_video_dataset,
    unassigned_split,
)
from trainer.tasks.video_classification.demo import (
    CSV_NAME,
    LABELS,
    ensure_demo_videos,
    write_moving_videos,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ramp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 2-second video (20 frames at 10 fps) that CSVs in these tests point at."""
    return write_ramp_video(tmp_path_factory.mktemp("ramp") / "ramp.mp4")


def linked_videos(folder: Path, source: Path, names: list[str]) -> None:
    """Many video files for the price of one: symbolic links to a real video."""
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).symlink_to(source)


def test_parse_seconds() -> None:
    assert parse_seconds("inf", 0.0) == math.inf
    assert parse_seconds(" Infinity ", 0.0) == math.inf
    assert parse_seconds("", 7.0) == 7.0
    assert parse_seconds("1.5", 0.0) == 1.5
    assert parse_seconds("1.5s", 0.0) == 1.5  # AutoML's JSON durations
    for bad in ("abc", "-1", "nan", "1,5"):
        with pytest.raises(ValueError):
            parse_seconds(bad, 0.0)


def test_csv_segments_inf_clipping_and_named_splits(tmp_path: Path, ramp: Path) -> None:
    linked_videos(tmp_path, ramp, ["v/a.mp4", "v/b.mp4", "v/c.mp4"])
    csv = tmp_path / "data.csv"
    csv.write_text(
        "TRAIN,v/a.mp4,left,0,1\n"
        "TRAIN,v/a.mp4,right,1,inf\n"  # a second segment of the same video, to its end
        "VALIDATION,v/b.mp4,left,0.5,1.5\n"  # AutoML's alias
        "TEST,v/c.mp4,right,1,99\n"  # ends past the 2-second video: clipped
        f"TEST,{tmp_path / 'v' / 'c.mp4'},left,0,1\n"  # an absolute path is another key
        "TRAIN,v/a.mp4,left,0,1\n"  # a repeated row is the same segment
        "\n"
    )
    manifest = read_video_dataset(csv)
    got = {(s.key, s.label, s.start, s.end, s.split) for s in manifest.segments}
    assert got == {
        ("v/a.mp4", "left", 0.0, 1.0, TRAIN),
        ("v/a.mp4", "right", 1.0, 2.0, TRAIN),
        ("v/b.mp4", "left", 0.5, 1.5, VALIDATE),
        ("v/c.mp4", "right", 1.0, 2.0, TEST),
        (str(tmp_path / "v" / "c.mp4"), "left", 0.0, 1.0, TEST),
    }
    assert all(s.path.is_file() for s in manifest.segments)
    assert manifest.labels == ["left", "right"]
    assert manifest.durations["v/a.mp4"] == pytest.approx(2.0)
    assert manifest.counts() == {TRAIN: 2, VALIDATE: 1, TEST: 2}
    assert not manifest.skipped


def test_bad_rows_missing_corrupt_and_past_end_are_skipped_and_reported(
    tmp_path: Path, ramp: Path
) -> None:
    linked_videos(tmp_path, ramp, ["a.mp4", "b.mp4", "c.mp4"])
    write_corrupt_video(tmp_path / "garbage.mp4")
    write_corrupt_video(tmp_path / "truncated.mp4", source=ramp)
    (tmp_path / "empty.mp4").write_bytes(b"")
    csv = tmp_path / "data.csv"
    csv.write_text(
        "TRAIN,a.mp4,left,0,1\n"
        "TRAIN,a.mp4,right,1,inf\n"
        "VALIDATE,b.mp4,right,0,inf\n"
        "TEST,c.mp4,left,0,inf\n"
        "TRAIN,a.mp4,right,abc,1\n"  # line 5: not a number
        "TRAIN,a.mp4,right,1,1\n"  # start == end
        "TRAIN,a.mp4,right,1.5,0.5\n"  # start > end
        "TRAIN,a.mp4,right,-1,1\n"  # negative
        "TRAIN,a.mp4,right,inf,inf\n"
        "TRAIN,a.mp4\n"  # no label
        "TRAIN,a.mp4,right,0,1,extra\n"
        "TRAIN,a.mp4,right,2,inf\n"  # starts at the end of the 2-second video
        "TRAIN,a.mp4,right,5,9\n"
        "TRAIN,nowhere.mp4,right,0,1\n"
        "TRAIN,nowhere.mp4,left,1,2\n"
        "TRAIN,garbage.mp4,right,0,1\n"
        "TRAIN,truncated.mp4,right,0,1\n"
        "TRAIN,empty.mp4,right,0,1\n"
    )
    manifest = read_video_dataset(csv)
    assert len(manifest.segments) == 4
    assert manifest.skipped == Counter({BAD_ROW: 7, PAST_END: 2, MISSING: 2, UNREADABLE: 3})
    assert manifest.skipped_examples[BAD_ROW].startswith(f"{csv}:5: ")
    assert "not a non-negative number" in manifest.skipped_examples[BAD_ROW]
    assert "starts at 2s, video ends at 2s" in manifest.skipped_examples[PAST_END]
    assert manifest.skipped_examples[MISSING].endswith("nowhere.mp4")
    assert manifest.skipped_examples[UNREADABLE].endswith("garbage.mp4")
    text = describe(manifest)
    assert "4 segments of 3 videos, 2 labels" in text
    assert "skipped 14 segments" in text and "2 missing_video (e.g." in text


def test_unassigned_videos_split_80_20_by_video_and_stay_whole(tmp_path: Path, ramp: Path) -> None:
    names = [f"clips/video_{i:03d}.mp4" for i in range(300)]
    linked_videos(tmp_path, ramp, names)
    csv = tmp_path / "data.csv"
    rows = []
    for index, name in enumerate(names):
        # Three segments a video, two labels: a split per row would break videos apart.
        first, second = ("left", "right") if index % 2 else ("right", "left")
        rows += [f"{name},{first},0,0.5", f"UNASSIGNED,{name},{second},0.5,1.5"]
        rows.append(f"{name},{first},1.5,inf")
    csv.write_text("\n".join(rows) + "\n")

    manifest = read_video_dataset(csv, check_workers=2)
    splits_of = {}
    for segment in manifest.segments:
        splits_of.setdefault(segment.key, set()).add(segment.split)
    assert all(len(splits) == 1 for splits in splits_of.values())  # no video in two splits
    split = {key: splits.pop() for key, splits in splits_of.items()}
    for key, name in split.items():
        # TEST is exactly the hash's 20%; VALIDATE is carved from the hash's TRAIN videos only.
        assert (name == TEST) == (unassigned_split(key) == TEST)
        assert unassigned_split(key) == (TRAIN if split_for(key) == TRAIN else TEST)
    videos = Counter(split.values())
    assert 0.15 < videos[TEST] / 300 < 0.25
    assert 0.05 < videos[VALIDATE] / 300 < 0.15  # 1/8 of the ~80% training videos
    assert sum(videos.values()) == 300

    again = read_video_dataset(csv, check_workers=1)
    assert again.fingerprint() == manifest.fingerprint()
    # One more video does not move any other: each video's split depends on its path alone.
    (tmp_path / "clips" / "late.mp4").symlink_to(ramp)
    csv.write_text(csv.read_text() + "clips/late.mp4,left,0,inf\n")
    grown = read_video_dataset(csv)
    assert {s.key: s.split for s in grown.segments if s.key != "clips/late.mp4"} == split
    assert grown.fingerprint() != manifest.fingerprint()


def test_unassigned_rows_join_the_split_their_video_names(tmp_path: Path, ramp: Path) -> None:
    linked_videos(tmp_path, ramp, ["a.mp4", "b.mp4", "c.mp4", "d.mp4"])
    csv = tmp_path / "data.csv"
    csv.write_text(
        "TRAIN,a.mp4,left,0,1\nUNASSIGNED,a.mp4,right,1,2\n"
        "TEST,b.mp4,left,0,1\nb.mp4,right,1,2\n"
        "VALIDATE,c.mp4,left,0,1\n"
        "TRAIN,d.mp4,right,0,1\n"
    )
    manifest = read_video_dataset(csv)
    assert {(s.key, s.split) for s in manifest.segments} == {
        ("a.mp4", TRAIN),
        ("b.mp4", TEST),
        ("c.mp4", VALIDATE),
        ("d.mp4", TRAIN),
    }


def segment(key: str, label: str, split: str = TRAIN) -> Segment:
    return Segment(Path(key), key, label, 0.0, 1.0, split)


def test_validation_is_carved_by_video_and_never_empties_a_label() -> None:
    keys = [f"v{i}" for i in range(400)]
    low = [k for k in keys if _validation_rank(k) < 0.125]
    high = sorted((k for k in keys if _validation_rank(k) >= 0.125), key=_validation_rank)
    # A label whose only training video hashes into validation keeps it for training.
    lonely = [segment(low[0], "rare"), segment(low[1], "common"), segment(high[0], "common")]
    lonely.append(segment(high[1], "common", TEST))
    carved = {s.key: s.split for s in carve_validation(lonely, 0.125)}
    assert carved == {low[0]: TRAIN, low[1]: VALIDATE, high[0]: TRAIN, high[1]: TEST}
    # When no video hashes low enough, the lowest one still goes, so small datasets validate.
    few = [segment(high[0], "a"), segment(high[1], "a"), segment(high[2], "b")]
    few += [segment(high[3], "b")]
    carved = {s.key: s.split for s in carve_validation(few, 0.125)}
    assert carved == {high[0]: VALIDATE, high[1]: TRAIN, high[2]: TRAIN, high[3]: TRAIN}
    # Both segments of a moved video move together.
    pair = [segment(low[1], "a"), segment(low[1], "b"), segment(high[0], "a")]
    pair.append(segment(high[0], "b"))
    assert [s.split for s in carve_validation(pair, 0.125)] == [VALIDATE, VALIDATE, TRAIN, TRAIN]


def test_datasets_that_cannot_train_are_clear_errors(tmp_path: Path, ramp: Path) -> None:
    linked_videos(tmp_path, ramp, ["a.mp4", "b.mp4", "c.mp4"])
    with pytest.raises(UserError, match="is not a file"):
        read_video_dataset(tmp_path / "nothing.csv")
    bad_label = tmp_path / "label.csv"
    bad_label.write_text("TRAIN,a.mp4,turn left,0,1\n")
    with pytest.raises(UserError, match="'turn left' is invalid"):
        read_video_dataset(bad_label)
    one_label = tmp_path / "one.csv"
    one_label.write_text("TRAIN,a.mp4,left,0,1\nTEST,b.mp4,left,0,1\nTRAIN,gone.mp4,right,0,1\n")
    with pytest.raises(UserError, match=r"1 usable label\(s\) \(left\).*missing_video"):
        read_video_dataset(one_label)
    no_train = tmp_path / "no_train.csv"
    no_train.write_text("TRAIN,a.mp4,left,0,1\nVALIDATE,b.mp4,right,0,1\nTEST,c.mp4,right,0,1\n")
    with pytest.raises(UserError, match="right have no TRAIN segment"):
        read_video_dataset(no_train)
    no_test = tmp_path / "no_test.csv"
    no_test.write_text("TRAIN,a.mp4,left,0,1\nTRAIN,b.mp4,right,0,1\nTRAIN,c.mp4,right,0,1\n")
    with pytest.raises(UserError, match="no TEST segment"):
        read_video_dataset(no_test)


def test_generated_videos_decode_to_the_expected_frames(tmp_path: Path) -> None:
    csv = write_moving_videos(tmp_path / "a", per_label=2, size=32, fps=8, seconds=2.0, seed=3)
    rows = [line.split(",") for line in csv.read_text().splitlines()]
    assert len(rows) == 4 * 2 + 2 * 1  # one row a plain video, two a two-segment video
    assert {row[2] for row in rows} == set(LABELS)
    two = [row for row in rows if "two_segments_0000" in row[1]]
    assert [(row[3], row[4]) for row in two] == [("0", "1"), ("1", "inf")]
    assert two[0][2] != two[1][2]
    for row in rows:
        with av.open(str(csv.parent / row[1])) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
        assert probe_video(csv.parent / row[1]).duration == pytest.approx(2.0)
        assert probe_video(csv.parent / row[1]).fps == pytest.approx(8.0)
    # The same seed writes the same dataset.
    again = write_moving_videos(tmp_path / "b", per_label=2, size=32, fps=8, seconds=2.0, seed=3)
    assert again.read_text() == csv.read_text()
    assert read_video_dataset(again).fingerprint() == read_video_dataset(csv).fingerprint()


def test_demo_dataset_is_written_once_and_atomically(tmp_path: Path) -> None:
    csv = ensure_demo_videos(tmp_path, per_label=3, size=32, fps=8, seconds=2.0)
    assert csv.name == CSV_NAME and csv.is_file()
    stamp = csv.stat().st_mtime_ns
    assert ensure_demo_videos(tmp_path, per_label=3, size=32, fps=8, seconds=2.0) == csv
    assert csv.stat().st_mtime_ns == stamp
    assert not list(csv.parent.parent.glob(".staging-*"))
    manifest = read_video_dataset(csv)
    assert manifest.labels == sorted(LABELS)
    assert not manifest.skipped


def test_reading_video_datasets_does_not_import_torch() -> None:
    code = (
        "import sys, trainer.tasks.video_classification.data, "
        "trainer.tasks.video_classification.demo; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
