"""Batch prediction and evaluations of a stored model, through the CLI and unit by unit."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import LOCAL, Ran, cli_in_process, read_json
from tests.test_automl_conformance import check_batch_prediction_parses
from tests.test_evaluation import is_png
from tests.test_manage import cli, one_line_error
from tests.test_resume import mlflow_client
from trainer.data.manifest import TEST, read_dataset
from trainer.data.prediction import ShardedJsonl, read_input_csv
from trainer.errors import UserError
from trainer.tasks.image_classification.predict import classification_record

# -- units --------------------------------------------------------------------------------


def test_input_csv_takes_quoted_paths_and_skips_blank_lines(tmp_path: Path) -> None:
    csv_file = tmp_path / "in.csv"
    csv_file.write_text('\ufeffa.png\n\n"my dir/b c.png"\n"x,y.png"\ngs://bucket/z.jpg\n')
    assert read_input_csv(csv_file) == ["a.png", "my dir/b c.png", "x,y.png", "gs://bucket/z.jpg"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png\nb.png,c.png\n", "line 2: expected one image path per line, got 2 fields"),
        ('"unclosed.png\n', "is not a valid CSV"),
        ("\n\n", "lists no images"),
    ],
)
def test_malformed_input_csv_is_refused(tmp_path: Path, text: str, message: str) -> None:
    csv_file = tmp_path / "in.csv"
    csv_file.write_text(text)
    with pytest.raises(UserError, match=message):
        read_input_csv(csv_file)


def test_record_keeps_labels_at_or_above_the_threshold_best_first() -> None:
    import numpy as np

    record = classification_record("x.png", np.array([0.2, 0.5, 0.3]), ["a", "b", "c"], 0.3)
    assert record["ID"] == "x.png"
    assert [(a["annotationSpecId"], a["displayName"]) for a in record["annotations"]] == [
        ("1", "b"),
        ("2", "c"),
    ]
    assert record["annotations"][0]["classification"] == {"score": 0.5}
    nothing = classification_record("y.png", np.array([0.2, 0.5, 0.3]), ["a", "b", "c"], 0.9)
    assert nothing == {"ID": "y.png", "annotations": []}


def test_shards_hold_at_most_shard_size_lines(tmp_path: Path) -> None:
    shards = ShardedJsonl(tmp_path, "image_classification", shard_size=2)
    for index in range(5):
        shards.write({"ID": str(index)})
    shards.close()
    assert [p.name for p in shards.files] == [f"image_classification_{i}.jsonl" for i in (1, 2, 3)]
    lines = [p.read_text().splitlines() for p in shards.files]
    assert [len(chunk) for chunk in lines] == [2, 2, 1]
    assert [json.loads(line)["ID"] for chunk in lines for line in chunk] == list("01234")
    empty = ShardedJsonl(tmp_path / "none", "errors", shard_size=2)
    empty.close()
    assert empty.files == [] and not (tmp_path / "none").exists()


# -- a trained model, through the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def trained(mobile_models):
    """The session's mobile-versatile-1 model: only this module evaluates it again."""
    model_type = "mobile-versatile-1"
    model = mobile_models.models[model_type]
    return mobile_models.cwd, mobile_models.run_dirs[model_type], model["name"].rsplit("/", 1)[1]


def stored_evaluation(run_dir: Path) -> list[dict]:
    (path,) = run_dir.glob("evaluations/*/evaluation.json")
    return read_json(path)


def predict(cwd: Path, model_id: str, rows: list[str], *extra: str):
    (cwd / "batch.csv").write_text("\n".join(rows) + "\n")
    return cli("predict", model_id, "--input", "batch.csv", "--output", "out", *extra, cwd=cwd)


def read_jsonl(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for path in paths for line in path.read_text().splitlines()]


def test_training_records_an_evaluation_with_plots(trained) -> None:
    cwd, run_dir, model_id = trained
    evaluation = stored_evaluation(run_dir)
    assert evaluation[0]["name"].startswith(f"{LOCAL}/models/{model_id}/modelEvaluations/")
    assert [e["displayName"] for e in evaluation[1:]] == read_json(run_dir / "state.json")["labels"]
    folder = next(run_dir.glob("evaluations/*"))
    plots = ["precision_recall.png", "confusion_matrix.png", "worst_examples.png"]
    assert all(is_png(folder / name) for name in plots)
    figures = evaluation[0]["classificationEvaluationMetrics"]
    accuracy_entry = figures["confidenceMetricsEntry"][0]
    assert accuracy_entry["recallAt1"] == pytest.approx(
        read_json(run_dir / "metrics.json")["test_accuracy"]
    )
    model = read_json(run_dir / "model.json")
    assert model["imageClassificationModelMetadata"]["nodeQps"] > 0


def test_predicting_the_test_images_matches_the_stored_evaluation(
    trained, tiny_shapes: Path
) -> None:
    cwd, run_dir, model_id = trained
    test_items = read_dataset(tiny_shapes).split(TEST)
    (cwd / "broken.png").write_bytes(b"not a png")
    rows = [f'"{item.path}"' for item in test_items] + ["missing.png", "broken.png"]
    result = predict(cwd, model_id, rows, "--score-threshold", "0", "--shard-size", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = Path(result.stdout.strip())
    assert folder.parent == (cwd / "out").resolve()
    display_name = read_json(run_dir / "model.json")["displayName"]
    assert re.fullmatch(
        rf"prediction-{display_name}-\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z", folder.name
    )

    shards = sorted(
        folder.glob("image_classification_*.jsonl"), key=lambda p: int(p.stem.split("_")[-1])
    )
    assert all(len(p.read_text().splitlines()) <= 5 for p in shards)
    assert len(shards) == -(-len(test_items) // 5)
    records = read_jsonl(shards)
    assert [r["ID"] for r in records] == [
        str(item.path) for item in test_items
    ]  # as given, in order
    labels = read_json(run_dir / "state.json")["labels"]
    assert all(len(r["annotations"]) == len(labels) for r in records)  # threshold 0: every label
    right = sum(
        r["annotations"][0]["displayName"] == item.label
        for r, item in zip(records, test_items, strict=True)
    )
    stored = stored_evaluation(run_dir)[0]["classificationEvaluationMetrics"]
    assert right / len(test_items) == pytest.approx(
        stored["confidenceMetricsEntry"][0]["recallAt1"]
    )

    errors = read_jsonl(list(folder.glob("errors_*.jsonl")))
    assert [(e["ID"], e["errors"]["code"]) for e in errors] == [
        ("missing.png", 5),
        ("broken.png", 3),
    ]

    # The operation is AutoML's BatchPredict, its failed inputs listed.
    metadata, _ = check_batch_prediction_parses(
        "image_classification", cwd, result, cwd / "batch.csv"
    )
    failures = [(f.message.split(":")[0], f.code) for f in metadata.partial_failures]
    assert failures == [("missing.png", 5), ("broken.png", 3)]


def test_score_threshold_filters_annotations(
    trained, tiny_shapes: Path, monkeypatch, capsys
) -> None:
    cwd, _, model_id = trained
    items = read_dataset(tiny_shapes).split(TEST)[:6]
    (cwd / "batch.csv").write_text("\n".join(str(i.path) for i in items) + "\n")
    # Two decoding processes: the parallel path (the default on 2 cores is none; see predict.py).
    result = cli_in_process(
        cwd, monkeypatch, capsys, "predict", model_id, "--input", "batch.csv", "--output", "out",
        "--score-threshold", "0.4", "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(list(Path(result.stdout.strip()).glob("image_classification_*.jsonl")))
    scores = [[a["classification"]["score"] for a in r["annotations"]] for r in records]
    assert all(s >= 0.4 for row in scores for s in row)
    assert all(row == sorted(row, reverse=True) for row in scores)
    assert not list(Path(result.stdout.strip()).glob("errors_*.jsonl"))  # none failed, no file


def test_a_csv_where_every_image_fails_fails_the_job(trained, monkeypatch, capsys) -> None:
    cwd, _, model_id = trained
    (cwd / "gone.csv").write_text("gone_1.png\ngone_2.png\n")
    result = cli_in_process(
        cwd, monkeypatch, capsys, "predict", model_id, "--input", "gone.csv", "--output", "out"
    )
    assert result.returncode == 2
    assert "every one of the 2 images failed" in result.stderr.splitlines()[-1]


def test_evaluate_again_and_list_evaluations(
    trained, tiny_shapes: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    cwd, run_dir, model_id = trained

    def cli(*args: str, cwd: Path) -> Ran:
        return cli_in_process(cwd, monkeypatch, capsys, *args)

    again = cli("models", "evaluate", model_id, cwd=cwd)
    assert again.returncode == 0, again.stderr[-3000:]
    folder = cwd / again.stdout.split("files")[1].strip()
    assert is_png(folder / "confusion_matrix.png")
    listing = cli("models", "evaluations", model_id, cwd=cwd)
    assert listing.returncode == 0 and listing.stdout.count("TEST split") == 2
    resources = json.loads(cli("models", "evaluations", model_id, "--json", cwd=cwd).stdout)
    overall = [r for r in resources["modelEvaluation"] if r["annotationSpecId"] == ""]
    labels = read_json(run_dir / "state.json")["labels"]
    assert len(overall) == 2 and len(resources["modelEvaluation"]) == 2 * (1 + len(labels))
    first, second = (o["classificationEvaluationMetrics"]["auPrc"] for o in overall)
    assert first == pytest.approx(second, abs=1e-6)  # the same model on the same images

    # Another labelled dataset: all of it is evaluated; unknown labels are refused.
    other = tmp_path / "other"
    for label in labels[:2]:
        (other / label).mkdir(parents=True)
        for source in sorted((tiny_shapes / label).iterdir())[:3]:
            (other / label / source.name).write_bytes(source.read_bytes())
    result = cli("models", "evaluate", model_id, "--dataset", str(other), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"evaluatedExampleCount\s+6\b", result.stdout)
    (other / "zebra").mkdir()
    (other / "zebra" / "z.png").write_bytes(
        (tiny_shapes / labels[0]).iterdir().__next__().read_bytes()
    )
    refused = cli("models", "evaluate", model_id, "--dataset", str(other), cwd=cwd)
    assert refused.returncode == 2
    assert "labels the model was not trained on: zebra" in refused.stderr.strip().splitlines()[-1]


def test_expired_model_cannot_predict_export_or_evaluate(trained) -> None:
    cwd, _, model_id = trained
    client = mlflow_client(cwd)
    real = client.get_registered_model(model_id).tags["expire_time"]
    past = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    client.set_registered_model_tag(model_id, "expire_time", past)
    (cwd / "batch.csv").write_text("a.png\n")
    try:
        for verb in (
            ["predict", model_id, "--input", "batch.csv", "--output", "out"],
            ["models", "export", model_id],
            ["models", "evaluate", model_id],
        ):
            assert f"model {model_id} expired on" in one_line_error(cli(*verb, cwd=cwd))
    finally:
        client.set_registered_model_tag(model_id, "expire_time", real)


def test_urls_are_read_through_fsspec(tmp_path: Path) -> None:
    """With --allow-remote (a SourcePolicy with a timeout), http URLs are read through fsspec:
    here from a local HTTP server, read in this process."""
    import functools
    import http.server
    import threading

    import torch
    from PIL import Image

    from trainer.data.images import eval_transform
    from trainer.data.prediction import predict_images
    from trainer.data.prediction_inputs import SourcePolicy
    from trainer.tasks.image_classification.predict import RESULTS_PREFIX, classification_records

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    served = tmp_path / "bucket"
    served.mkdir()
    Image.new("RGB", (8, 8), (250, 10, 10)).save(served / "cat.png")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    try:
        result = predict_images(
            classification_records(network, ["cat", "dog"], 0.0),
            [f"{url}/cat.png", f"{url}/gone.png"],
            tmp_path, eval_transform([4, 4], [0.5] * 3, [0.5] * 3), tmp_path / "out",
            RESULTS_PREFIX, workers=0, sources=SourcePolicy(10.0),
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert (result.predicted, result.failed) == (1, 1)
    (record,) = read_jsonl(result.result_files)
    assert record["ID"] == f"{url}/cat.png" and len(record["annotations"]) == 2
    (error,) = read_jsonl(result.error_files)
    assert error["errors"]["code"] == 5  # fsspec's missing file (404) is NOT_FOUND too
