"""Billed from the first byte, flushed throughout: a training killed with SIGKILL in any phase
(checking the dataset's files, building the image cache, the TEST pass) has its cost on record
at most ``checkpoint.cost_flush_seconds`` old. One process per operation."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import FAST, read_json, run_dirs, run_trainer
from tests.test_manage import one_line_error
from tests.test_resume import refusal, start_trainer, wait_for

FLUSH = 0.5  # checkpoint.cost_flush_seconds in these runs
SLACK = 0.6  # a state.json write and this test's 0.1 s polling
BIG = 3200  # pixels a side: each big image takes about 20 ms to decode


def big_jpeg() -> bytes:
    """A smooth picture that decodes slowly but is small on disk (a gradient JPEG)."""
    ramp = Image.linear_gradient("L").resize((BIG, BIG))
    out = io.BytesIO()
    Image.merge("RGB", (ramp, ramp.rotate(90), ramp)).save(out, format="JPEG", quality=80)
    return out.getvalue()


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory) -> Path:
    """Two CSVs over one folder: in ``big_train.csv`` the TRAIN images are big JPEGs (checking
    the files and building the cache take seconds), in ``big_test.csv`` the TEST images are (the
    TEST pass takes seconds, training a moment). Returns the folder."""
    folder = tmp_path_factory.mktemp("slow")
    (folder / "source.jpg").write_bytes(big_jpeg())
    big, small = [], []
    for index in range(300):
        os.link(folder / "source.jpg", folder / f"{index}.jpg")  # one file's bytes, many names
        big.append((f"{index}.jpg", "light" if index % 2 else "dark"))
    for index in range(24):
        shade = 20 + 200 * (index % 2)
        Image.new("RGB", (32, 32), (shade,) * 3).save(folder / f"s{index}.png")
        small.append((f"s{index}.png", "light" if shade > 128 else "dark"))

    def write(name: str, train: list, validate: list, test: list) -> None:
        rows = [f"{split},{path},{label}" for split, items in
                (("TRAIN", train), ("VALIDATE", validate), ("TEST", test))
                for path, label in items]  # fmt: skip
        (folder / name).write_text("\n".join(rows) + "\n")

    write("big_train.csv", big, small[:4], small[4:8])
    write("big_test.csv", small[8:], small[:4], big)
    return folder


def killed_in(phase: str, cwd: Path, home: Path, *args: str, into: float = 1.5) -> float:
    """Start a training, SIGKILL it ``into`` seconds after it is seen in ``phase``; return the
    seconds of its cost lost (elapsed billing time not on record)."""
    process = start_trainer(
        *FAST, f"checkpoint.cost_flush_seconds={FLUSH}", *args, cwd=cwd, home=home
    )
    seen = None
    try:

        def in_phase_long_enough() -> bool:
            nonlocal seen
            assert process.poll() is None, process.communicate()[1][-3000:]
            state = next(iter(run_dirs(cwd)), None)
            if state is None or not (state / "state.json").is_file():
                return False
            now = read_json(state / "state.json")
            if now.get("phase") != phase:
                assert seen is None, f"the {phase} phase ended before the kill"
                return False
            seen = seen or time.monotonic()
            return time.monotonic() - seen >= into

        wait_for(in_phase_long_enough, timeout=300)
        killed_at = time.time()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    (run_dir,) = run_dirs(cwd)
    state = read_json(run_dir / "state.json")
    assert state["phase"] == phase and state["status"] == "RUNNING"
    return killed_at - state["piece_started"] - state["spent_seconds"]


def test_a_kill_while_checking_the_files_loses_at_most_a_flush_and_one_resume_runs_at_once(
    slow_data: Path, tmp_path: Path, trainer_home: Path
) -> None:
    dataset = f"dataset.path={slow_data / 'big_train.csv'}"
    lost = killed_in("checking the dataset", tmp_path, trainer_home, dataset, into=1.0)
    assert -0.1 <= lost <= FLUSH + SLACK

    # One process per operation: two resumes of the killed operation at once, the second is
    # refused while the first holds the run directory (checking 300 big images, then training).
    (run_dir,) = run_dirs(tmp_path)
    operation = read_json(run_dir / "operation.json")["name"].rsplit("/", 1)[1]
    resumed = start_trainer(f"resume_operation={operation}", cwd=tmp_path, home=trainer_home)
    try:
        wait_for(lambda: read_json(run_dir / "state.json")["pid"] == resumed.pid, timeout=120)
        second = run_trainer(f"resume_operation={operation}", cwd=tmp_path, home=trainer_home)
        line = one_line_error(second)
        assert "is in use by process" in line and str(resumed.pid) in line
        assert resumed.poll() is None  # the first goes on undisturbed
    finally:
        resumed.kill()
        resumed.wait(timeout=30)


# Slow (make test-all): the suite's kill during the TEST pass covers the same flusher.
@pytest.mark.slow
def test_a_kill_while_building_the_cache_loses_at_most_a_flush(
    slow_data: Path, tmp_path: Path, trainer_home: Path
) -> None:
    home = tmp_path / "home"  # a cache of its own: the build must happen in this run
    lost = killed_in(
        "preparing data", tmp_path, home, f"dataset.path={slow_data / 'big_train.csv'}",
        "data.cache=on", into=1.0,
    )  # fmt: skip
    assert -0.1 <= lost <= FLUSH + SLACK
    assert any((home / "cache").rglob("progress.json"))  # it was building


def test_a_kill_during_the_test_pass_loses_at_most_a_flush(
    slow_data: Path, tmp_path: Path, trainer_home: Path
) -> None:
    lost = killed_in(
        "testing", tmp_path, trainer_home, f"dataset.path={slow_data / 'big_test.csv'}",
        "early_stopping.patience=1", "early_stopping.min_patience_steps=0",
        "early_stopping.patience_before_first_gain=1",
        "early_stopping.lr_drop_patience=null", "budget.train_budget_milli_node_hours=40",
        into=1.0,
    )  # fmt: skip
    assert -0.1 <= lost <= FLUSH + SLACK


def test_the_check_stops_when_the_budget_would_be_crossed(
    slow_data: Path, tmp_path: Path, trainer_home: Path
) -> None:
    """A budget smaller than the check: it stops in time, the operation fails within budget.

    2 milli-node-hours (7.2 s): the check of 300 big images takes about 6 s after a set-up of
    1 to 4 s (opening a new MLflow store on a loaded machine), and a budget of 1 (3.6 s) could
    be spent by that set-up alone."""
    result = run_trainer(
        *FAST, f"dataset.path={slow_data / 'big_train.csv'}",
        "budget.train_budget_milli_node_hours=2", "budget.save_reserve_seconds=1.5",
        cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    assert "ran out while checking the dataset's files" in refusal(result)
    (run_dir,) = run_dirs(tmp_path)
    operation = read_json(run_dir / "operation.json")
    assert operation["done"] and operation["error"]["code"] == 2
    assert read_json(run_dir / "state.json")["spent_seconds"] <= 2 * 3.6
