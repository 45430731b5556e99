"""Hostile and odd inputs, as an attacker or a careless user would make them: each is skipped and
reported, or refused with exit code 2 and one line, never a crash, and never costs more than the
budget."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import FAST, REPO, read_json, run_dirs, run_trainer
from tests.test_manage import mlflow_server, one_line_error  # noqa: F401 - a fixture
from trainer.data.manifest import NOT_UTF8, TOO_LARGE, read_dataset
from trainer.errors import UserError
from trainer.tasks.image_classification.demo import write_shapes

# -- files that claim more than they hold ---------------------------------------------------------


def write_bomb_png(path: Path, width: int = 20_000, height: int = 20_000) -> None:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels: PIL refuses to open
    it (DecompressionBombError, which is not an OSError) before reading any pixel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def non_utf8_name(folder: Path, stem: bytes = b"caf\xe9") -> Path:
    """A file name that is bytes no text spells (Latin-1, as an old camera writes it)."""
    return folder / os.fsdecode(stem + b".png")


@pytest.fixture
def hostile_images(tmp_path: Path) -> Path:
    folder = tmp_path / "shapes"
    write_shapes(folder, per_label=12, size=32, seed=3)
    write_bomb_png(folder / "circle" / "bomb.png")
    Image.new("RGB", (32, 32), (0, 0, 0)).save(non_utf8_name(folder / "square"))
    return folder


def test_a_decompression_bomb_and_a_non_utf8_name_are_skipped_and_reported(
    hostile_images: Path,
) -> None:
    manifest = read_dataset(hostile_images)
    assert manifest.skipped == {TOO_LARGE: 1, NOT_UTF8: 1}
    assert manifest.skipped_examples[TOO_LARGE].endswith("bomb.png")
    assert "caf" in manifest.skipped_examples[NOT_UTF8]
    assert len(manifest.items) == 6 * 12


def test_a_training_on_hostile_images_reports_them_and_keeps_its_budget(
    hostile_images: Path, tmp_path: Path, trainer_home: Path
) -> None:
    result = run_trainer(
        *FAST, f"dataset.path={hostile_images}", "budget.train_budget_milli_node_hours=4",
        "budget.disable_early_stopping=true", cwd=tmp_path, home=trainer_home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 too large" in result.stderr and "1 name not UTF-8" in result.stderr
    (run_dir,) = run_dirs(tmp_path)
    meta = read_json(run_dir / "model.json")["imageClassificationModelMetadata"]
    assert int(meta["trainCostMilliNodeHours"]) <= 4


# -- CSVs that are not what they claim --------------------------------------------------------


def test_a_csv_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    table = tmp_path / "latin1.csv"
    table.write_bytes("TRAIN,caf\u00e9.png,cat\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text .* save it as UTF-8"):
        read_dataset(table)


def test_a_field_past_the_csv_limit_is_one_line(tmp_path: Path) -> None:
    table = tmp_path / "long.csv"
    table.write_text(f"TRAIN,{'a' * (csv.field_size_limit() + 10)}.png,cat\n")
    with pytest.raises(UserError, match="not a readable CSV row"):
        read_dataset(table)


def test_a_training_refuses_a_non_utf8_csv_in_one_line(tmp_path: Path, trainer_home) -> None:
    table = tmp_path / "latin1.csv"
    table.write_bytes("TRAIN,caf\u00e9.png,cat\n".encode("latin-1"))
    result = run_trainer(*FAST, f"dataset.path={table}", cwd=tmp_path, home=trainer_home)
    assert "not UTF-8 text" in one_line_error(result)
    assert not run_dirs(tmp_path) and not (tmp_path / "mlflow.db").exists()  # nothing opened


def test_a_prediction_csv_cell_cannot_start_a_spreadsheet_formula() -> None:
    from trainer.data.prediction import spreadsheet_safe

    assert spreadsheet_safe('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    assert spreadsheet_safe("+1") == "'+1" and spreadsheet_safe("@SUM(A1)") == "'@SUM(A1)"
    assert spreadsheet_safe("videos/a.mp4") == "videos/a.mp4"


def test_video_prediction_writes_a_formula_path_as_text(tmp_path: Path) -> None:
    import numpy as np

    from trainer.tasks.video_classification.clips import ClipSpec
    from trainer.tasks.video_classification.demo import write_video
    from trainer.tasks.video_classification.predict import (
        PredictOptions,
        predict_videos,
        read_prediction_csv,
    )

    write_video(tmp_path / "ok.mp4", [np.zeros((32, 32, 3), np.uint8)] * 10, fps=10)
    (tmp_path / "in.csv").write_text("ok.mp4,0,inf\n\"=cmd|' /C calc'!A0\",0,1\n")
    spec = ClipSpec(4, 1, (32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def uniform(clips):
        import torch

        return torch.full((len(clips), 2), 0.5)

    result = predict_videos(
        read_prediction_csv(tmp_path / "in.csv"), tmp_path, uniform, ["a", "b"], spec,
        tmp_path / "out", PredictOptions(), workers=0,
    )  # fmt: skip
    rows = list(csv.reader(result.csv_path.open()))
    assert rows[1][0] == "'=cmd|' /C calc'!A0" and rows[1][4].startswith("NOT_FOUND")


# -- videos that claim more than they hold ----------------------------------------------------


def test_one_second_windows_of_a_video_claiming_days_are_refused_for_its_row() -> None:
    from trainer.tasks.video_classification.predict import (
        MAX_ONE_SECOND_WINDOWS,
        ONE_SECOND,
        PredictOptions,
        _kind_windows,
        _RowError,
    )

    days = 3 * 86_400.0
    with pytest.raises(_RowError, match=f"more than {MAX_ONE_SECOND_WINDOWS} a row"):
        _kind_windows(ONE_SECOND, "unused.mp4", 0.0, days, PredictOptions())
    assert len(_kind_windows(ONE_SECOND, "unused.mp4", 0.0, 3.0, PredictOptions())) == 3


def test_a_video_of_absurd_resolution_is_skipped_as_too_large(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from trainer.tasks.video_classification import data as video_data
    from trainer.tasks.video_classification.demo import write_video

    frames = [np.full((64, 96, 3), value, np.uint8) for value in range(0, 250, 25)]
    for name in ("a", "b", "c", "d"):
        write_video(tmp_path / f"{name}.mp4", frames, fps=10)
    (tmp_path / "videos.csv").write_text(
        "TRAIN,a.mp4,left,0,1\nTRAIN,b.mp4,right,0,1\nVALIDATE,c.mp4,left,0,1\n"
        "TEST,d.mp4,right,0,1\nTEST,d.mp4,left,0,0.5\n"
    )
    # A limit below these frames' 64 x 96 pixels stands for frames past PIL's pixel limit,
    # which would take gigabytes to write here.
    monkeypatch.setattr(video_data, "MAX_FRAME_PIXELS", 64 * 96 - 1)
    with pytest.raises(UserError, match=f"0 usable label.*5 {video_data.TOO_LARGE}"):
        video_data.read_video_dataset(tmp_path / "videos.csv")
    with pytest.raises(video_data.VideoTooLarge, match="frames of 96x64 pixels are too large"):
        video_data.probe_video(tmp_path / "a.mp4")


# -- values read back ---------------------------------------------------------------------------


@pytest.mark.parametrize("spent", ["-Infinity", "NaN", "-1.0", "Infinity", "true", '"12"'])
def test_state_with_a_cost_that_is_not_a_cost_is_refused(tmp_path: Path, spent: str) -> None:
    from trainer.job.run_state import RunState

    state = RunState(
        "operations/ICN1234567890123456789", "ICN1234567890123456780", "a" * 32, {}, "t"
    )
    state.save(tmp_path)
    text = (tmp_path / "state.json").read_text()
    (tmp_path / "state.json").write_text(
        text.replace('"spent_seconds": 0.0', f'"spent_seconds": {spent}')
    )
    with pytest.raises(UserError, match="spent_seconds .* cannot be resumed"):
        RunState.load(tmp_path)


def test_state_with_ids_that_are_not_ids_is_refused(tmp_path: Path) -> None:
    from trainer.job.run_state import RunState

    RunState("operations/../../etc", "ICN1234567890123456780", "a" * 32, {}, "t").save(tmp_path)
    with pytest.raises(UserError, match="is not an operation's name"):
        RunState.load(tmp_path)
    RunState("operations/ICN1", "ICN1234567890123456780", "a" * 32, {}, "t").save(tmp_path)
    with pytest.raises(UserError, match="is not an ID"):
        RunState.load(tmp_path)
    name = "operations/ICN1234567890123456789"
    for when in ("t", "2026-01-31T09:00:00"):  # garbage; no time zone
        RunState(name, "ICN1234567890123456780", "a" * 32, {}, when).save(tmp_path)
        with pytest.raises(UserError, match="create_time .* is not an RFC 3339 time"):
            RunState.load(tmp_path)


def test_the_cost_on_record_in_the_store_is_billed_at_least() -> None:
    from trainer.job.run_state import RunState

    state = RunState("operations/ICN1234567890123456789", "ICN1234567890123456780", "a" * 32,
                     {}, "t", spent_seconds=3.0)  # fmt: skip
    state.at_least("41.5")
    assert state.spent_seconds == 41.5
    for hostile in ("-inf", "nan", "-5", None, "many"):
        state.at_least(hostile)
        assert state.spent_seconds == 41.5


def test_saving_times_that_are_not_durations_do_not_shrink_the_reserves(tmp_path: Path) -> None:
    import json

    from tests.typed import budget as typed_budget
    from trainer.job.work_history import FILE_NAME, WorkHistory, save_reserves

    (tmp_path / FILE_NAME).write_text(
        json.dumps({"t/m": {"recording": [1e-9, -3, "NaN", True], "checkpoint": [1e-6]}})
    )
    history = WorkHistory(tmp_path, "t/m")
    assert history.recent("recording") == [1e-9] and history.recent("checkpoint") == [1e-6]
    budget = {"save_reserve_seconds": "auto", "save_reserve_first_seconds": 20.0,
              "save_reserve_factor": 2.0, "save_reserve_floor_seconds": 1.0}  # fmt: skip
    reserves = save_reserves(typed_budget(budget), history)
    assert reserves.recording == reserves.checkpoint == 1.0
    (tmp_path / FILE_NAME).write_text('{"t/m": {"recording": [1e999, NaN]}}')
    assert history.recent("recording") == []
    assert save_reserves(typed_budget(budget), history).recording == 20.0


def test_stored_labels_and_ids_are_checked_as_user_input() -> None:
    from trainer.store.resources import check_id, stored_labels

    assert stored_labels('["cat", "dog"]') == ["cat", "dog"]
    for hostile in ('["../../etc"]', "[]", '{"a": 1}', "not json", '["a", 3]'):
        with pytest.raises(UserError, match="stored labels"):
            stored_labels(hostile)
    assert check_id("IOD1234567890123456789") == "IOD1234567890123456789"
    for hostile in ("../ICN1", "ICN12", "icn1234567890123456789", "ICN1234567890123456789/x", 7):
        with pytest.raises(UserError, match="is not an ID"):
            check_id(hostile)


def test_the_classifier_builder_is_taken_from_an_allow_list() -> None:
    from trainer.tasks.image_classification.networks import build_backbone

    for hostile in ("get_weight", "list_models", "detection", "__class__"):
        with pytest.raises(UserError, match="is not a torchvision image classifier"):
            build_backbone(hostile, 3, pretrained=None)


# -- credentials ----------------------------------------------------------------------------------


def test_credentials_are_redacted_from_uris_and_messages() -> None:
    from tests.typed import settings
    from trainer.settings import redact

    uri = "https://alice:s3cret@mlflow.example.com:5000/path"
    assert redact(uri) == "https://mlflow.example.com:5000/path"
    assert redact(f"cannot reach {uri} (timeout)") == (
        "cannot reach https://mlflow.example.com:5000/path (timeout)"
    )
    assert redact("sqlite:///mlflow.db") == "sqlite:///mlflow.db"
    # Any RFC 3986 userinfo: an @ or a : in the password, percent-encoding, a user alone,
    # another scheme (an Optuna storage); a path's own @ stays.
    for given, shown in [
        ("https://alice:p@ss@host:5000/x", "https://host:5000/x"),
        ("https://alice:p%40s:s@host", "https://host"),
        ("http://token@host/api", "http://host/api"),
        (
            "postgresql+psycopg://u:pw@db.example:5432/optuna",
            "postgresql+psycopg://db.example:5432/optuna",
        ),
        (
            "['mlflow.tracking_uri=https://a:b@h', 'x=1']",
            "['mlflow.tracking_uri=https://h', 'x=1']",
        ),
        ("file:///data/photo@2x.png", "file:///data/photo@2x.png"),
    ]:
        assert redact(given) == shown
    typed = settings(mlflow={"tracking_uri": uri, "experiment_name": "x"})
    assert "s3cret" not in str(typed.to_dict()) and typed.mlflow.tracking_uri.reveal() == uri


def test_a_failing_cancel_poll_does_not_end_a_training(caplog) -> None:
    from trainer.job.checkpoints import CancelWatch, StopRequest

    def unreachable() -> bool:
        raise ConnectionError("https://alice:s3cret@mlflow.example.com is down")

    stop = StopRequest()
    watch = CancelWatch(unreachable, 0.0, stop)
    for _ in range(3):
        watch.on_train_batch_end(None)
    assert stop.reason is None
    warnings = [r.getMessage() for r in caplog.records if "cancel request" in r.getMessage()]
    assert len(warnings) == 1 and "s3cret" not in warnings[0]


def test_the_rest_reader_authenticates_and_reads_every_page() -> None:
    """Against a stand-in for MLflow's REST API, in a thread: real HTTP, two pages of runs."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from trainer.store.reader import RestReader

    seen: list[str] = []

    class Fake(BaseHTTPRequestHandler):
        def _reply(self, body: dict) -> None:
            seen.append(self.headers.get("Authorization", ""))
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._reply({"experiment": {"experiment_id": "1"}})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            page = int(body.get("page_token") or 0)
            runs = [{"info": {"run_id": f"r{page}{i}", "artifact_uri": ""}, "data": {}}
                    for i in range(3)]  # fmt: skip
            self._reply({"runs": runs, **({"next_page_token": "1"} if page == 0 else {})})

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        reader = RestReader(f"http://alice:s3cret@127.0.0.1:{port}", "vision-trainer")
        assert [run.run_id for run in reader.runs()] == ["r00", "r01", "r02", "r10", "r11", "r12"]
    finally:
        server.shutdown()
    expected = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert seen and all(header == expected for header in seen)
    assert "s3cret" not in reader.base_url


def test_a_cli_verb_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    """`... --json | head`: the reader is gone before the verb writes."""
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "sqlite:///m.db"}
    command = [sys.executable, "-m", "trainer", "operations", "list", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=tmp_path, env=env, text=True)  # fmt: skip
    process.stdout.close()  # as head does once it has its lines
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


# -- checkpoints from the store -------------------------------------------------------------------


class SideEffect:
    """Unpickled, it creates a file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_hostile_checkpoint(path: Path, marker: Path) -> str:
    """A checkpoint-shaped file whose pickle runs code; returns its SHA-256."""
    import torch

    from trainer.store.resources import file_sha256

    torch.save({"state_dict": {}, "global_step": 1, "payload": SideEffect(marker)}, path)
    return file_sha256(path)


def test_a_checkpoint_whose_pickle_runs_code_is_refused_everywhere(
    mobile_models, tmp_path: Path, trainer_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the store's artifacts and tags (a shared server) replaces a model's
    checkpoint, and its recorded digest, with a pickle that runs code. Training further, and
    loading the model for predict, evaluate or export, refuse it, and the code never runs."""
    from tests.test_resume import mlflow_client, refusal
    from trainer.job.checkpoints import load_first_good
    from trainer.store.catalog import Catalog
    from trainer.stored_model import load_network, trained_model

    cwd, model = mobile_models.cwd, mobile_models.models["mobile-low-latency-1"]
    model_id = model["name"].rsplit("/", 1)[1]
    best = mobile_models.run_dirs["mobile-low-latency-1"] / "checkpoints" / "best.ckpt"
    marker = tmp_path / "code_ran"
    saved = best.read_bytes()
    client = mlflow_client(cwd)
    real_digest = client.get_registered_model(model_id).tags["checkpoint_sha256"]
    try:
        hostile = write_hostile_checkpoint(best, marker)
        client.set_registered_model_tag(model_id, "checkpoint_sha256", hostile)
        further = run_trainer(*FAST, f"base_model_id={model_id}", cwd=cwd, home=trainer_home)
        assert "missing or unreadable" in refusal(further)
        assert "Unsupported global" in further.stderr  # torch's weights-only unpickler said no

        monkeypatch.chdir(cwd)
        stored = trained_model(Catalog("sqlite:///mlflow.db", "vision-trainer"), model_id, "x")
        with pytest.raises(UserError, match="does not load as weights"):
            load_network(stored)
        assert load_first_good([best]) is None  # resuming skips it the same way
    finally:
        best.write_bytes(saved)
        client.set_registered_model_tag(model_id, "checkpoint_sha256", real_digest)
    assert not marker.exists()


def test_a_checkpoint_changed_after_training_is_refused(
    mobile_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The digest recorded with the model: a checkpoint changed since (here and in the store)
    is not that model's."""
    from trainer.store.catalog import Catalog
    from trainer.stored_model import trained_model

    cwd, model = mobile_models.cwd, mobile_models.models["mobile-versatile-1"]
    best = mobile_models.run_dirs["mobile-versatile-1"] / "checkpoints" / "best.ckpt"
    artifacts = list((cwd / "mlartifacts").rglob("best.ckpt"))
    saved = {path: path.read_bytes() for path in [best, *artifacts]}
    monkeypatch.chdir(cwd)
    try:
        for path in saved:
            path.write_bytes(saved[path] + b"\0")
        with pytest.raises(UserError, match="is not the one recorded with it"):
            trained_model(Catalog("sqlite:///mlflow.db", "vision-trainer"), model["name"], "x")
    finally:
        for path, content in saved.items():
            path.write_bytes(content)


def test_artifacts_are_removed_only_under_the_stores_own_folder(tmp_path: Path) -> None:
    from trainer.store.catalog import _remove_local

    root = tmp_path / "mlartifacts"
    (root / "run1").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _remove_local(elsewhere.as_uri(), root)
    _remove_local((root / ".." / "elsewhere").as_uri(), root)
    _remove_local(root.as_uri(), root)
    assert elsewhere.is_dir() and root.is_dir()
    _remove_local((root / "run1").as_uri(), root)
    assert not (root / "run1").exists()


def test_a_failure_that_cannot_be_recorded_still_reports_the_original_error(caplog) -> None:
    """A full disk or a store that is down while recording how an operation ended: the
    original error stands, the recording failure is logged."""
    from types import SimpleNamespace

    from trainer.job.train import _end_unfinished

    class Down:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise OSError("No space left on device")

            return fail

    job = SimpleNamespace(
        state=SimpleNamespace(status="RUNNING", run_id="r"), operation=Down(), store=Down(),
        meter=SimpleNamespace(cost_milli_node_hours=lambda: 3), flush=Down().flush,
    )  # fmt: skip
    _end_unfinished(job, "FAILED", 13, "ValueError: the original")  # does not raise
    assert any("could not record that the operation ended FAILED" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_an_operation_file_that_is_not_the_operation_is_written_afresh(tmp_path: Path) -> None:
    from trainer.store.automl import Operation, resource_id

    name = "projects/local/locations/local/operations/ICN1234567890123456789"
    path = tmp_path / "operation.json"
    for hostile in ("not json", '["a"]', '{"name": "operations/ICN9999999999999999999"}'):
        path.write_text(hostile)
        operation = Operation.reopen(path, name)
        assert operation.name == name and read_json(path)["name"] == name
        assert read_json(path)["done"] is False
    Operation(resource_id(name), path).fail(10, "interrupted")
    reopened = Operation.reopen(path, name)
    assert "error" not in reopened.resource and reopened.resource["done"] is False


# -- detached trainings ---------------------------------------------------------------------------

META = "imageClassificationModelMetadata"

# Stops BUDGET_REACHED in a few seconds, so that it may be resumed with more.
SHORT = [*FAST, "budget.train_budget_milli_node_hours=5", "budget.disable_early_stopping=true"]


def wait_for_operation(cwd: Path, name: str, *flags: str) -> dict:
    """The operation once it is done, from ``operations get`` as a user would see it."""
    from tests.test_manage import cli
    from tests.test_resume import wait_for

    def ended() -> bool:
        got = cli(*flags, "operations", "get", name, "--json", cwd=cwd)
        return got.returncode == 0 and json.loads(got.stdout)["done"]

    wait_for(ended, timeout=240)
    return json.loads(cli(*flags, "operations", "get", name, "--json", cwd=cwd).stdout)


def test_detach_written_with_plus_plus_starts_one_training(tmp_path: Path, tiny_shapes) -> None:
    """``++detach=true`` once passed the filter that drops ``detach=``: the background process
    detached again, and its own did, forever, and no training ever ran."""
    started = run_trainer(*SHORT, f"dataset.path={tiny_shapes}", "++detach=true",
                          cwd=tmp_path, home=tmp_path)  # fmt: skip
    assert started.returncode == 0, started.stderr
    operation = wait_for_operation(tmp_path, started.stdout.strip())
    assert operation["metadata"]["createTime"] and "error" not in operation
    (run_dir,) = run_dirs(tmp_path)
    assert "in the background" not in (run_dir / "train.log").read_text()  # it trained


@pytest.mark.slow  # two trainings
def test_a_detached_resume_goes_on_with_the_same_operation(tmp_path: Path, tiny_shapes) -> None:
    first = run_trainer(*SHORT, f"dataset.path={tiny_shapes}", cwd=tmp_path, home=tmp_path)
    assert first.returncode == 0, first.stderr
    (run_dir,) = run_dirs(tmp_path)
    name = read_json(run_dir / "operation.json")["name"]
    cost = int(read_json(run_dir / "model.json")[META]["trainCostMilliNodeHours"])
    resumed = run_trainer(
        f"resume_operation={name.rsplit('/', 1)[-1]}", "detach=true",
        "budget.train_budget_milli_node_hours=12", cwd=tmp_path, home=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == name  # the operation that goes on, not a new one
    from tests.test_resume import wait_for

    # Done already (BUDGET_REACHED) until the background process takes it up: its model is
    # recorded again at the larger budget when it ends.
    wait_for(lambda: read_json(run_dir / "model.json")[META]["trainBudgetMilliNodeHours"] == "12",
             timeout=240)  # fmt: skip
    assert wait_for_operation(tmp_path, name)["done"]
    assert int(read_json(run_dir / "model.json")[META]["trainCostMilliNodeHours"]) > cost
    assert "resume" in (run_dir / "train.log").read_text()  # its log is the operation's


# -- no secret on disk ----------------------------------------------------------------------------

# Loaded into every process of the internal-error case (PYTHONPATH): its training fails with an
# error that is not the user's, which Hydra would report with the command line as it was.
BREAK_TRAINING = """
import os
if os.environ.get("BREAK_TRAINING"):
    import trainer.app

    def broken(*args, **kwargs):
        raise RuntimeError("an internal failure")

    trainer.app._operation = broken
"""


@pytest.mark.slow
def test_a_password_appears_nowhere(
    mlflow_server: str,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    tiny_shapes: Path,
) -> None:
    """With a real ``mlflow server`` whose URI holds a password: a training, its resume, a
    prediction, an export, an internal error, a detached training and a sweep on submitit's
    executor; no file under the working folder, the home or the server's store and artifacts
    holds the password, nor does any output."""
    from tests.test_sweep import TRIAL, environment

    secret = mlflow_server.replace("http://", "http://alice:s3cret@")
    said = _all_phases(tmp_path / "work", tmp_path / "home", tiny_shapes, secret)
    sweep = subprocess.run(
        [sys.executable, "-m", "trainer", "-m", "hydra/sweeper=budgeted", *TRIAL,
         f"dataset.path={tiny_shapes}", "optimizer.lr=tag(log,interval(1e-4,3e-2))",
         "sweep.budget_milli_node_hours=8", "sweep.min_trial_milli_node_hours=4",
         "sweep.max_trial_milli_node_hours=4", "sweep.pruning=none",
         "sweep.executor=submitit_local", f"mlflow.tracking_uri={secret}"],
        cwd=tmp_path / "work", env=environment(tmp_path / "home"), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    said += sweep.stdout + sweep.stderr
    assert "s3cret" not in said
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".pkl" for p in written)  # submitit's jobs, among what is read
    assert [p for p in written if b"s3cret" in p.read_bytes()] == []
    sweeps = tmp_path / "home" / "sweeps"
    assert {oct(p.stat().st_mode & 0o777) for p in [sweeps, *sweeps.iterdir()]} == {"0o700"}


def _all_phases(work: Path, home: Path, data: Path, secret: str) -> str:
    """Every phase but the sweep, its URI given as each takes it; what they printed."""
    work.mkdir()
    store = f"mlflow.tracking_uri={secret}"
    said = []

    def trainer(*args: str, env: dict | None = None, code: int = 0) -> str:
        ran = run_trainer(*args, cwd=work, home=home, env=env)
        assert ran.returncode == code, ran.stderr[-3000:]
        said.append(ran.stdout + ran.stderr)
        return ran.stdout

    model = json.loads(trainer(*SHORT, f"dataset.path={data}", store))
    (run_dir,) = run_dirs(work)
    operation = read_json(run_dir / "operation.json")["name"].rsplit("/", 1)[-1]
    trainer(f"resume_operation={operation}", "budget.train_budget_milli_node_hours=8", store)
    model_id = model["name"].rsplit("/", 1)[-1]
    (work / "rows.csv").write_text(f"{next(data.rglob('*.png'))}\n")
    verbs = ["--tracking-uri", secret]
    trainer(*verbs, "predict", model_id, "--input", "rows.csv", "--output", "predicted")
    trainer(*verbs, "models", "export", model_id, "--format", "torchscript", "--output", "out")
    hook = work / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BREAK_TRAINING)
    broken = trainer(*SHORT, f"dataset.path={data}", store, code=1, env={
        "BREAK_TRAINING": "1", "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"})  # fmt: skip
    assert "an internal failure" in said[-1] and not broken
    detached = trainer(*SHORT, f"dataset.path={data}", store, "detach=true").strip()
    wait_for_operation(work, detached, *verbs)
    return "".join(said)


def test_the_ranks_brief_travels_as_json_not_a_pickle(tmp_path: Path, monkeypatch) -> None:
    """What a torchrun or srun rank receives is parsed as JSON: nothing that reaches it through
    the group's store is unpickled (the torchrun tests carry it between real processes)."""
    import torch.distributed as dist

    from trainer.job import distributed

    def pickled(*args, **kwargs):
        raise AssertionError("broadcast_object_list unpickles what it receives")

    monkeypatch.setattr(dist, "broadcast_object_list", pickled)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        brief = {"config": {"seed": 1}, "run_dir": "/x", "reserves": {"recording": 1.5}}
        assert distributed._broadcast_json(brief) == brief
        distributed._hand_over(None)
    finally:
        dist.destroy_process_group()


def test_a_lock_file_planted_as_a_link_is_refused_and_what_it_names_is_untouched(
    tmp_path: Path,
) -> None:
    from trainer.job.run_state import hold_run_dir
    from trainer.store.store import _store_lock

    precious = tmp_path / "precious"
    precious.write_text("keep")
    symbolic, hard = tmp_path / "run", tmp_path / "other_run"
    for run_dir in (symbolic, hard):
        run_dir.mkdir()
    (symbolic / ".lock").symlink_to(precious)
    os.link(precious, hard / ".lock")
    for run_dir, what in ((symbolic, "symbolic link"), (hard, "not a lock file of its own")):
        with pytest.raises(UserError, match=what):
            hold_run_dir(run_dir)
    Path(f"{tmp_path / 'mlflow.db'}.lock").symlink_to(precious)
    with (
        pytest.raises(UserError, match="symbolic link"),
        _store_lock(f"sqlite:///{tmp_path}/mlflow.db"),
    ):
        pass
    assert precious.read_text() == "keep"


# -- processes known by more than a pid ------------------------------------------------------------


def interrupted_sweep(folder: Path, sweep_pid: int) -> None:
    """A sweep's folder as one whose process died: status RUNNING, its lock held by nobody."""
    from budgets.ledger import SweepLedger
    from tests.test_sweep_record import WRITTEN

    (folder / "trials").mkdir(parents=True)
    (folder / "sweep.json").write_text(
        json.dumps({**WRITTEN, "name": f"sweeps/{folder.name}", "pid": sweep_pid})
    )
    (folder / "sweep.lock").touch()
    SweepLedger.create(folder / "ledger.json", 40).admit("0", 8)


def test_a_reused_pid_is_taken_for_neither_the_trial_nor_the_sweep(tmp_path: Path) -> None:
    """An unrelated ``sleep`` holds the pid that the sweep and its trial had: the sweep shows as
    interrupted, and its resume settles the trial (at its whole grant) instead of waiting on
    the stranger forever."""
    from dataclasses import replace

    from budgets.ledger import SweepLedger, TrialState
    from trainer.sweep import liveness, record
    from trainer.sweep.record import SweepStatus, TrialRecord
    from trainer.sweep.runner import Sweep

    stranger = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "SWP1"
        interrupted_sweep(folder, stranger.pid)
        started = liveness.start_ticks(stranger.pid)
        assert started is not None
        run_dir = str(folder / "trials" / "0")
        trial = TrialRecord(0, {"optimizer.lr": 0.01}, "ICN1", "ICN2", run_dir,
                            pid=stranger.pid, pid_start=started - 1)  # fmt: skip
        trial.save(folder)
        assert not trial.alive() and replace(trial, pid_start=started).alive()
        assert record.summary(folder).sweep.status is SweepStatus.INTERRUPTED
        sweep = Sweep(folder, tracking_uri=None, storage=None)
        sweep.study.ask(sweep.space.distributions)
        sweep._adopt()
        assert sweep.processes == {0: None}
        sweep._reap()
        assert sweep.processes == {}
        assert SweepLedger(folder / "ledger.json").trials()["0"].state is TrialState.FAILED
    finally:
        stranger.kill()


def test_one_process_per_sweep(tmp_path: Path) -> None:
    """A second ``sweeps resume`` of a running sweep is refused, as long as the first lives."""
    from trainer.sweep import liveness, record
    from trainer.sweep.record import SweepStatus
    from trainer.sweep.runner import resume_sweep

    folder = tmp_path / "sweeps" / "SWP1234567890123456789"
    interrupted_sweep(folder, 0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from trainer.sweep import liveness; liveness.hold_sweep(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert record.summary(folder).sweep.status is SweepStatus.RUNNING
        with pytest.raises(UserError, match="running in another process"):
            resume_sweep(str(tmp_path), folder.name, None, "sqlite:////nowhere.db", None)
    finally:
        holder.kill()
        holder.wait()
    assert not liveness.sweep_running(folder, None)


# -- records read back ----------------------------------------------------------------------------


def test_a_stored_display_name_that_is_a_path_is_refused_before_it_names_a_folder() -> None:
    """An export is written to ``model-export-<displayName>-<time>`` under --output, and a
    prediction to a folder named after it: the store's value is checked as a user's would be."""
    from trainer.stored_model import trained_model

    class Registry:
        client = None

        def usable_model(self, model_id: str, purpose: str) -> tuple[dict, dict]:
            name = "projects/local/locations/local/models/ICN1234567890123456789"
            return {"name": name, "displayName": "../../x"}, {"run_id": "r"}

    with pytest.raises(UserError, match="displayName '../../x' is invalid"):
        trained_model(Registry(), "ICN1234567890123456789", "export")


def test_sweep_ids_and_stray_files_are_checked_as_user_input(tmp_path: Path) -> None:
    from tests.test_sweep_record import WRITTEN
    from trainer.sweep import record

    folder = tmp_path / "sweeps" / "SWP1234567890123456789"
    (folder / "trials").mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps(WRITTEN))
    (tmp_path / "sweep.json").write_text(json.dumps(WRITTEN))  # what ../ would reach
    for hostile in ("..", "../..", "sweeps/../..", "SWP1/../../x"):
        with pytest.raises(UserError, match="is not a sweep ID"):
            record.sweep_folder(tmp_path, hostile)
    assert record.sweep_folder(tmp_path, "sweeps/SWP1234567890123456789") == folder
    (folder / "trials" / "notes.json").write_text("{}")  # a stray file a user left there
    (folder / "trials" / "0.json.swp").write_text("")
    assert record.read_trials(folder) == []


@pytest.mark.parametrize(
    "field, value",
    [("cost", "Infinity"), ("cost", "-5"), ("limit", "8.5"), ("budget", "NaN"), ("limit", "true")],
)
def test_a_ledger_whose_figures_are_not_counts_is_refused(
    tmp_path: Path, field: str, value: str
) -> None:
    from budgets.ledger import SweepLedger

    path = tmp_path / "ledger.json"
    ledger = SweepLedger.create(path, 40)
    ledger.admit("0", 8)
    text = path.read_text()
    if field == "budget":
        text = text.replace('"budget_milli_node_hours": 40', f'"budget_milli_node_hours": {value}')
    else:
        original = '"limit": 8' if field == "limit" else '"cost": 0'
        text = text.replace(original, f'"{field}": {value}')
    path.write_text(text)
    with pytest.raises(ValueError, match="is not a whole number|is below"):
        SweepLedger(path)


def test_a_closed_stdout_does_not_fail_a_finished_training(tmp_path: Path, tiny_shapes) -> None:
    """``python -m trainer ... | head -c0``: the reader has gone by the time the Model is
    printed, after it is registered; the training stays a success."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer", *SHORT, f"dataset.path={tiny_shapes}"], cwd=tmp_path,
        env={**env, "VISION_TRAINER_HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.close()
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 0, stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    assert read_json(run_dir / "state.json")["status"] == "SUCCEEDED"
    assert "error" not in read_json(run_dir / "operation.json")
    assert "could not print the model" in stderr


def test_a_model_recorded_without_an_expiry_expires_with_its_term() -> None:
    """No expire_time tag is not "never": creation plus the task's model_lifespan_months."""
    from trainer.store.resources import expired_on

    old = {"create_time": "2020-01-31T09:00:00.000000Z", "task": "image_classification"}
    assert expired_on(old) == "2021-07-31T09:00:00.000000Z"  # 18 months (conf/task)
    assert expired_on({**old, "create_time": "2099-01-01T00:00:00.000000Z"}) is None
    assert expired_on({**old, "task": "../../etc/passwd"}) is None  # not one of ours to count
    with pytest.raises(UserError, match="create_time tag"):
        expired_on({**old, "create_time": "yesterday"})
