"""Issue 29's prediction-input cases ("What to build", point 4): rows that name other schemes, a
FIFO, a device or a server that accepts and never answers each fail their own row while the job
goes on; an image over Pillow's pixel limit is not decoded; too many rows and a bad --workers
are one line each, before any work. (tests/test_hostile_inputs.py holds the issue's other cases.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import Ran, Trained, cli_in_process, run_trainer
from tests.video_helpers import write_ramp_video
from trainer.data.manifest import TEST, read_dataset
from trainer.data.prediction_inputs import SourcePolicy
from trainer.tasks.video_classification.clips import ClipSpec
from trainer.tasks.video_classification.predict import (
    CSV_NAME,
    PredictOptions,
    predict_videos,
    read_prediction_csv,
)

TIMEOUT = 2  # seconds: VISION_TRAINER_PREDICT_TIMEOUT in these tests (conf/predict.yaml: 20)


@pytest.fixture(scope="module")
def model(mobile_models: Trained, tiny_shapes: Path) -> tuple[Path, str, list[str]]:
    """The session's smallest image model (predicted with, never changed): its directory, ID
    and two TEST images that predict."""
    found = mobile_models.models["mobile-low-latency-1"]
    images = [str(item.path) for item in read_dataset(tiny_shapes).split(TEST)[:2]]
    return mobile_models.cwd, found["name"].rsplit("/", 1)[1], images


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts every connection and never answers (nor closes one)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed: the test is over
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not, on Linux)
    listener.close()
    for connection in held:
        connection.close()


def write_rows(cwd: Path, rows: list[str]) -> str:
    (cwd / "hostile.csv").write_text("\n".join(f'"{row}"' for row in rows) + "\n")
    return "hostile.csv"


def predict_in_process(
    cwd: Path, model_id: str, rows: list[str], monkeypatch, capsys, *extra: str
) -> Ran:
    return cli_in_process(
        cwd, monkeypatch, capsys, "predict", model_id, "--input", write_rows(cwd, rows),
        "--output", "out", *extra,
    )  # fmt: skip


def outcome(result: Any) -> tuple[list[str], dict[str, tuple[int, str]]]:
    """The predicted IDs and, per failed ID, its error row's code and message (``result``: a
    Ran or a CompletedProcess)."""
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip().splitlines()[-1])
    predicted = [
        json.loads(line)["ID"]
        for path in sorted(folder.glob("image_classification_*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    failed = {}
    for path in sorted(folder.glob("errors_*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            failed[record["ID"]] = (record["errors"]["code"], record["errors"]["message"])
    return predicted, failed


def one_line(result: Ran) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


# -- rows ---------------------------------------------------------------------------------


def test_rows_naming_other_schemes_fail_alone(model, monkeypatch, capsys) -> None:
    cwd, model_id, images = model
    refused = [
        "tcp://127.0.0.1:9/a.png",
        "udp://127.0.0.1:9/a.png",
        "sftp://example.invalid/a.png",
        "rtmp://127.0.0.1:9/live",
        "concat:a.png|b.png",
        "pipe:0",
        "memory://a.png",
        "simplecache::file:///etc/hostname",  # fsspec's chain: the first link names any protocol
        "file://example.invalid/a.png",  # a file URL on another host
    ]
    remote = "http://127.0.0.1:9/a.png"  # read only with --allow-remote
    result = predict_in_process(cwd, model_id, [images[0], *refused, remote], monkeypatch, capsys)
    predicted, failed = outcome(result)
    assert predicted == [images[0]]
    for row in refused:
        code, message = failed[row]
        assert code == 3 and message.startswith(row), (row, message)
        assert "not read" in message, message
    assert failed[remote] == (7, f"{remote}: http inputs are read only with --allow-remote")


def test_fifos_and_devices_fail_their_rows_without_blocking(model, tmp_path: Path) -> None:
    """A FIFO with no writer blocks whoever opens it; /dev/stdin waits for a terminal or a pipe.
    In a process of its own: a regression must fail the test, not hang the suite."""
    cwd, model_id, images = model
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    rows = [str(fifo), f"file://{fifo}", "/dev/stdin", "/dev/zero", str(tmp_path), images[0]]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    started = time.monotonic()
    result = run_trainer(
        "predict", model_id, "--input", str(tmp_path / "rows.csv"), "--output", "out",
        cwd=cwd, home=cwd, timeout=120,
    )  # fmt: skip
    predicted, failed = outcome(result)
    assert predicted == [images[0]]
    assert failed[str(fifo)] == (3, f"{fifo}: a FIFO, not a regular file: not read")
    assert failed[f"file://{fifo}"][1].endswith("a FIFO, not a regular file: not read")
    assert failed["/dev/stdin"] == (3, "/dev/stdin: files under /dev are not read")
    assert failed["/dev/zero"][0] == 3
    assert failed[str(tmp_path)][1].endswith("a folder, not a regular file: not read")
    assert time.monotonic() - started < 100


def test_a_server_that_never_answers_fails_its_row_within_the_timeout(
    model, silent_server: int
) -> None:
    cwd, model_id, images = model
    url = f"http://127.0.0.1:{silent_server}/never.png"
    started = time.monotonic()
    result = run_trainer(
        "predict", model_id, "--input", write_rows(cwd, [images[0], url, images[1]]),
        "--output", "out", "--allow-remote",
        cwd=cwd, home=cwd, timeout=120, env={"VISION_TRAINER_PREDICT_TIMEOUT": str(TIMEOUT)},
    )  # fmt: skip
    elapsed = time.monotonic() - started
    predicted, failed = outcome(result)
    assert predicted == [images[0], images[1]]
    assert failed[url] == (4, f"{url}: no answer within {TIMEOUT} s")
    # The job's own time (the summary line), beside the interpreter's start and the model's load.
    summary = re.search(r"failed, in ([\d.]+) s", result.stderr)
    assert summary, result.stderr[-3000:]
    seconds = float(summary.group(1))
    print(f"prediction {seconds:.1f} s, process {elapsed:.1f} s, timeout {TIMEOUT} s")
    assert seconds < 4 * TIMEOUT + 5


def test_an_image_over_pillows_pixel_limit_is_not_decoded(
    model, tmp_path: Path, monkeypatch, capsys
) -> None:
    from PIL import Image

    cwd, model_id, images = model
    side = int((Image.MAX_IMAGE_PIXELS or 0) ** 0.5) + 10  # just over: Pillow would only warn
    bomb = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(bomb)  # one colour: a few kilobytes on disk
    result = predict_in_process(cwd, model_id, [str(bomb), images[0]], monkeypatch, capsys)
    predicted, failed = outcome(result)
    assert predicted == [images[0]]
    code, message = failed[str(bomb)]
    assert code == 3 and "exceeds limit" in message, message


# -- a whole input ------------------------------------------------------------------------


def test_more_rows_than_the_cap_are_refused_in_one_line(model, monkeypatch, capsys) -> None:
    cwd, model_id, images = model
    monkeypatch.setenv("VISION_TRAINER_PREDICT_MAX_ROWS", "3")
    line = one_line(predict_in_process(cwd, model_id, images * 2, monkeypatch, capsys))
    assert "holds more than 3 rows, the most one prediction reads (max_rows in conf/predict" in line
    # At the cap, blank lines not counted: predicted.
    (cwd / "three.csv").write_text(f"{images[0]}\n\n{images[1]}\n\n{images[0]}\n")
    result = cli_in_process(
        cwd, monkeypatch, capsys, "predict", model_id, "--input", "three.csv", "--output", "out"
    )
    assert outcome(result)[0] == [images[0], images[1], images[0]]


@pytest.mark.parametrize("workers", ["-1", "65"])
def test_workers_out_of_bounds_are_refused_in_one_line(
    model, workers: str, monkeypatch, capsys
) -> None:
    cwd, model_id, images = model
    result = predict_in_process(cwd, model_id, images, monkeypatch, capsys, "--workers", workers)
    assert one_line(result) == (
        f"error: --workers {workers} must be between 0 (decode in the main process) and 64 "
        "(max_workers in conf/predict.yaml)"
    )


# -- video rows: FFmpeg opens them ----------------------------------------------------------


def test_video_rows_get_the_same_gate(tmp_path: Path, silent_server: int) -> None:
    """FFmpeg opens any protocol it was built with: the gate is the same, and a remote read has
    PyAV's timeout. Run in a thread: a hang must fail the test (closing the server ends it)."""
    write_ramp_video(tmp_path / "ramp.mp4")
    os.mkfifo(tmp_path / "pipe.mp4")
    hanging = f"http://127.0.0.1:{silent_server}/never.mp4"
    rows = ["ramp.mp4", "tcp://127.0.0.1:9/a.mp4", "concat:ramp.mp4|ramp.mp4", "pipe.mp4",
            "/dev/stdin", "gs://bucket/a.mp4", hanging]  # fmt: skip
    (tmp_path / "in.csv").write_text("".join(f"{row},0,inf\n" for row in rows))
    spec = ClipSpec(4, 2, (32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    out = tmp_path / "out"
    work = threading.Thread(
        target=predict_videos,
        args=(read_prediction_csv(tmp_path / "in.csv"), tmp_path,
              lambda clips: np.tile([0.3, 0.7], (len(clips), 1)), ["a", "b"], spec, out,
              PredictOptions(), 0, lambda done, total: None, SourcePolicy(float(TIMEOUT))),
        daemon=True,
    )  # fmt: skip
    started = time.monotonic()
    work.start()
    work.join(timeout=8 * TIMEOUT)
    elapsed = time.monotonic() - started
    assert not work.is_alive(), f"still predicting after {elapsed:.0f} s"
    with (out / CSV_NAME).open(newline="") as handle:
        status = {row[0]: row[4] for row in csv.reader(handle)}
    assert status["ramp.mp4"] == "OK"
    assert status["tcp://127.0.0.1:9/a.mp4"].startswith(
        "INVALID_ARGUMENT: tcp://127.0.0.1:9/a.mp4: tcp: inputs are not read"
    )
    assert "concat: inputs are not read" in status["concat:ramp.mp4|ramp.mp4"]
    assert status["pipe.mp4"] == "INVALID_ARGUMENT: pipe.mp4: a FIFO, not a regular file: not read"
    assert status["/dev/stdin"] == "INVALID_ARGUMENT: /dev/stdin: files under /dev are not read"
    assert "gs: inputs are not read" in status["gs://bucket/a.mp4"]  # FFmpeg reads no gs://
    assert status[hanging] == f"DEADLINE_EXCEEDED: {hanging}: no answer within {TIMEOUT} s"
    print(f"video rows done in {elapsed:.1f} s, timeout {TIMEOUT} s")
