"""Edge export for every task: verified packages through the CLI, TorchScript, a broken export,
an exporter's refusal, and the README's snippets running each package without this project or
torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import REPO, Trained, read_json
from tests.test_automl_conformance import check_export_operation_parses
from tests.test_manage import cli, cli_json, one_line_error
from trainer.data.manifest import TEST


def export(cwd: Path, model: dict, *extra: str) -> Path:
    result = cli(
        "models", "export", model["name"], "--output", str(cwd / "exports"), *extra, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip())


def stored(trained: Trained, model: dict, monkeypatch: pytest.MonkeyPatch):
    """The stored model as `models export` loads it, in this process."""
    from trainer.store.catalog import Catalog
    from trainer.stored_model import trained_model

    monkeypatch.chdir(trained.cwd)
    catalog = Catalog(f"sqlite:///{trained.cwd / 'mlflow.db'}", "vision-trainer")
    return trained_model(catalog, model["name"], "export")


def check_package(package: Path, model: dict, files: set[str]) -> dict:
    assert {p.name for p in package.iterdir()} == files | {"labels.txt", "metadata.json"}
    # A package is meant to be shared: its files get ordinary permissions, not mkstemp's 0600.
    from trainer.store.resources import UMASK

    assert (package / "metadata.json").stat().st_mode & 0o777 == 0o666 & ~UMASK
    meta = read_json(package / "metadata.json")
    assert meta["modelId"] == model["name"].rsplit("/", 1)[1]
    assert meta["verification"]["inputs"] > 0 and meta["verification"]["split"] == TEST
    assert meta["latencyMs"]["median"] > 0 and meta["latencyMs"]["runs"] >= 50
    return meta


def check_export_operation(cwd: Path, package: Path, task: str) -> None:
    """The export's operation names the package and is AutoML's ExportModel operation."""
    (operation,) = [
        op
        for op in cli_json("operations", "list", cwd=cwd)["operations"]
        if op["metadata"].get("exportModelDetails", {}).get("outputInfo")
        == {"gcsOutputDirectory": str(package)}
    ]
    check_export_operation_parses(task, operation)


def readme_snippet(name: str) -> str:
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- snippet: {name} -->")[1].split("<!-- end snippet -->")[0]
    return block.split("```python")[1].split("```")[0]


def run_snippet(name: str, folder: Path, *args: str) -> str:
    """Run a README snippet with the package alone: no project on the path, no torch loaded."""
    script = folder / name
    script.write_text(
        readme_snippet(name)
        + "\nimport sys\n"
        + "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer')]\n"
    )
    env = {"PATH": os.environ["PATH"]}  # no PYTHONPATH: nothing of the project on the path
    result = subprocess.run(
        [sys.executable, "-I", str(script), *args],
        cwd=folder, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# -- image classification ------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(mobile_models: Trained) -> Path:
    """The default type exported through the CLI, as a user exports it."""
    return export(mobile_models.cwd, mobile_models.models["mobile-low-latency-1"])


def check_image_package(package: Path, model: dict, model_type: str, files: set[str]) -> None:
    meta = check_package(package, model, files)
    assert meta["task"] == "image_classification" and meta["modelType"] == model_type
    assert meta["input_size"] == [32, 32]
    # The tolerance is 1e-4 of the logits' scale (at least 1), which depends on the training:
    # a 21.6 s EfficientNet-B0 once reached logits of 184 (tolerance 0.018).
    verification = meta["verification"]
    assert verification["tolerance"] >= 1e-4
    assert verification["maxAbsDifference"] < verification["tolerance"]
    assert verification["top1Disagreements"] == 0
    labels = (package / "labels.txt").read_text().split()
    assert labels == sorted(["circle", "square", "triangle", "cross", "stripes_h", "stripes_v"])


def test_the_cli_exports_a_verified_package(mobile_models, package) -> None:
    model = mobile_models.models["mobile-low-latency-1"]
    assert package.name.startswith(f"model-export-{model['displayName']}-")
    check_image_package(package, model, "mobile-low-latency-1", {"model.onnx"})
    check_export_operation(mobile_models.cwd, package, "image_classification")


@pytest.mark.parametrize(
    ("model_type", "fmt"),
    [("mobile-versatile-1", "torchscript"), ("mobile-high-accuracy-1", "onnx")],
)
def test_the_other_mobile_types_export_verified(
    mobile_models, model_type: str, fmt: str, tmp_path: Path, monkeypatch
) -> None:
    from trainer.export import FORMATS, export_package

    model = mobile_models.models[model_type]
    exported = export_package(stored(mobile_models, model, monkeypatch), fmt, tmp_path)
    check_image_package(exported, model, model_type, {FORMATS[fmt]})


def test_torchscript_export(mobile_models, tmp_path: Path, monkeypatch) -> None:
    from trainer.export import export_package

    model = mobile_models.models["mobile-low-latency-1"]
    package = export_package(stored(mobile_models, model, monkeypatch), "torchscript", tmp_path)
    meta = check_package(package, model, {"model.pt"})
    assert meta["format"] == "torchscript"
    assert meta["verification"]["maxAbsDifference"] < meta["verification"]["tolerance"]


def test_a_broken_export_fails_verification_and_leaves_nothing(
    mobile_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.export import ExportFailed, export_package

    trained = stored(mobile_models, mobile_models.models["mobile-low-latency-1"], monkeypatch)
    output = tmp_path / "exports"
    # Exported for 40x48 inputs, verified with the model's own 32x32 TEST images.
    with pytest.raises(ExportFailed, match="failed on the TEST inputs|differ"):
        export_package(trained, "onnx", output, export_size=[40, 48])
    assert list(output.iterdir()) == []


class Unscriptable(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (lambda: images)()  # TorchScript compiles no lambda


def test_an_exporter_refusal_names_the_reason_and_the_types_that_export(tmp_path: Path) -> None:
    from tests.typed import settings
    from trainer.export import ExportFailed, _write_or_explain
    from trainer.tasks import ExportPlan

    plan = ExportPlan(Unscriptable(), torch.zeros(1, 3), "image", ["logits"], [], None, {},
                      torchscript="script")  # fmt: skip
    cfg = settings("image_classification", model={"constructor": "custom_net"})
    with pytest.raises(ExportFailed) as refusal:
        _write_or_explain(plan, "torchscript", tmp_path / "model.pt", cfg)
    (line,) = str(refusal.value).splitlines()
    assert "torchscript cannot export model.constructor=custom_net" in line
    assert "the image_classification model types cloud, mobile-high-accuracy-1" in line


def test_unknown_model_and_format(mobile_models) -> None:
    cwd = mobile_models.cwd
    assert "ICN404" in one_line_error(cli("models", "export", "ICN404", cwd=cwd))
    line = one_line_error(cli("models", "export", "ICN404", "--format", "tf_saved_model", cwd=cwd))
    assert line.startswith("error: modelFormat 'tf_saved_model' is not offered here")


def test_readme_snippet_classifies_with_the_package_alone(
    mobile_models, package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = mobile_models.models["mobile-low-latency-1"]
    trained = stored(mobile_models, model, monkeypatch)
    item = trained.manifest().split(TEST)[0]
    label, score = run_snippet("classify.py", tmp_path, str(package), str(item.path)).split()
    labels = (package / "labels.txt").read_text().split()
    assert label in labels and 0 < float(score) <= 1

    # The same image through the trained model, as the trainer's evaluation prepares it.
    from PIL import Image

    from trainer.data.images import eval_transform
    from trainer.stored_model import load_network

    settings = trained.settings
    transform = eval_transform(settings.model.size, settings.data.mean, settings.data.std)
    with Image.open(item.path) as image, torch.no_grad():
        scores = load_network(trained)(transform(image.convert("RGB"))[None]).softmax(1)[0]
    assert abs(float(scores.max()) - float(score)) < 0.05  # Pillow's resize, not torchvision's
    if float(scores.max()) > 0.6:
        assert label == labels[int(scores.argmax())]
    assert json.loads((package / "metadata.json").read_text())["resize"].startswith("resize")


# -- object detection ------------------------------------------------------------------------


def test_box_comparison_wants_each_detection_within_a_pixel_with_its_label() -> None:
    import numpy as np

    from trainer.tasks.object_detection.export import box_comparison

    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.6, 0.2, 0.9, 0.4]], dtype=np.float32)
    scores, labels = np.array([0.9, 0.3], dtype=np.float32), np.array([1, 0])
    compare = box_comparison(100, 200)  # height, width: x is 200 pixels wide
    close = compare([[boxes, scores, labels]], [[boxes + [0.004, 0.009, 0, 0], scores, labels]])
    assert close.problem is None and close.figures["detectionsCompared"] == 4
    assert close.figures["maxBoxDifferencePixels"] == pytest.approx(0.9, abs=1e-3)
    shifted = compare([[boxes, scores, labels]], [[boxes + [0.01, 0, 0, 0], scores, labels]])
    assert "has no match in the export (the nearest 2.00 px off)" in shifted.problem
    relabelled = compare([[boxes, scores, labels]], [[boxes, scores, labels[::-1]]])
    assert "has no match in the export (none)" in relabelled.problem
    nothing = np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    assert "detects nothing" in compare([list(nothing)], [list(nothing)]).problem


def test_logit_comparison_wants_the_same_top_label() -> None:
    import numpy as np

    from trainer.tasks.image_classification.export import logit_comparison

    logits = np.array([[2.0, 1.0], [0.0, 3.0]], dtype=np.float32)
    swapped = logits[:, ::-1].copy()
    assert logit_comparison(None)([[logits]], [[logits + 1e-3]]).problem is None
    assert (
        "differs from the trained model's on 2"
        in logit_comparison(None)([[logits]], [[swapped]]).problem
    )
    assert "tolerance" in logit_comparison(1e-4)([[logits]], [[logits + 1e-3]]).problem
    # The tolerance follows the logits' scale: the same difference on logits 100 times larger.
    assert logit_comparison(1e-4)([[logits * 100]], [[logits * 100 + 1e-3]]).problem is None


@pytest.fixture(scope="module")
def detection_package(detection_model: Trained) -> Path:
    cwd, _, model, _ = detection_model.only()
    return export(cwd, model)


def test_detection_exports_with_boxes_within_a_pixel(detection_model, detection_package) -> None:
    cwd, _, model, _ = detection_model.only()
    meta = check_package(detection_package, model, {"model.onnx"})
    assert meta["task"] == "object_detection" and meta["modelType"] == "mobile-low-latency-1"
    assert meta["input_size"] == [64, 64] and "one image a call" in meta["layout"]
    assert set(meta["outputs"]) == {"boxes", "scores", "labels"}
    verification = meta["verification"]
    assert verification["detectionsCompared"] > 0
    assert verification["maxBoxDifferencePixels"] <= verification["pixelTolerance"] == 1.0
    assert meta["producedBy"].startswith("onnx opset")
    check_export_operation(cwd, detection_package, "object_detection")


def test_detection_torchscript_export(detection_model, tmp_path: Path, monkeypatch) -> None:
    from trainer.export import export_package

    cwd, _, model, _ = detection_model.only()
    package = export_package(stored(detection_model, model, monkeypatch), "torchscript", tmp_path)
    meta = check_package(package, model, {"model.pt"})
    assert meta["verification"]["maxBoxDifferencePixels"] <= 1.0


def test_readme_snippet_detects_with_the_package_alone(
    detection_model, detection_package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from trainer.stored_model import load_network
    from trainer.tasks.object_detection.export import ExportedDetector
    from trainer.tasks.object_detection.images import detection_eval_transform

    _, _, model, _ = detection_model.only()
    trained = stored(detection_model, model, monkeypatch)
    item = trained.manifest().split(TEST)[0]
    output = run_snippet("detect.py", tmp_path, str(detection_package), str(item.path), "0")
    lines = [line.split() for line in output.splitlines()]
    labels = (detection_package / "labels.txt").read_text().split()
    assert 0 < len(lines) <= 100 and all(line[0] in labels for line in lines)
    scores = [float(line[1]) for line in lines]
    assert scores == sorted(scores, reverse=True)

    # The same image through the trained detector, as evaluation prepares it.
    with Image.open(item.path) as image:
        pixels = detection_eval_transform(trained.settings.model.size)(image.convert("RGB"))
        width, height = image.size
    with torch.no_grad():
        boxes, found, classes = ExportedDetector(load_network(trained))(pixels[None])
    assert abs(float(found[0]) - scores[0]) < 0.05  # Pillow's resize, not torchvision's
    if float(found[0]) - float(found[1]) > 0.05:
        assert lines[0][0] == labels[int(classes[0])]
        corners = boxes[0].numpy() * [width, height, width, height]
        assert max(abs(float(v) - c) for v, c in zip(lines[0][2:], corners, strict=True)) < 3


# -- video classification ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_package(video_model: Trained) -> Path:
    cwd, _, model, _ = video_model.only()
    return export(cwd, model)


def test_video_exports_with_the_same_top_label(video_model, video_package) -> None:
    cwd, _, model, _ = video_model.only()
    meta = check_package(video_package, model, {"model.onnx"})
    assert meta["task"] == "video_classification"
    assert meta["frames_per_clip"] > 1 and meta["frame_stride"] >= 1
    assert meta["verification"]["top1Disagreements"] == 0
    assert meta["verification"]["maxAbsDifference"] < 1e-3
    check_export_operation(cwd, video_package, "video_classification")


def test_video_torchscript_export(video_model, tmp_path: Path, monkeypatch) -> None:
    from trainer.export import export_package

    cwd, _, model, _ = video_model.only()
    package = export_package(stored(video_model, model, monkeypatch), "torchscript", tmp_path)
    assert check_package(package, model, {"model.pt"})["verification"]["top1Disagreements"] == 0


def test_readme_snippet_classifies_a_video_with_the_package_alone(
    video_model, video_package, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.stored_model import load_network
    from trainer.tasks.video_classification.clips import decode_clip
    from trainer.tasks.video_classification.data import video_duration
    from trainer.tasks.video_classification.task import clip_spec

    _, _, model, _ = video_model.only()
    trained = stored(video_model, model, monkeypatch)
    segment = trained.manifest().split(TEST)[0]
    label, score = run_snippet("classify_video.py", tmp_path, str(video_package),
                               str(segment.path)).split()  # fmt: skip
    labels = (video_package / "labels.txt").read_text().split()
    assert label in labels and 0 < float(score) <= 1

    # The whole video's centred clip through the trained network, as evaluation decodes it.
    clip = decode_clip(segment.path, 0.0, video_duration(segment.path), clip_spec(trained.settings))
    with torch.no_grad():
        scores = load_network(trained)(clip[None]).softmax(1)[0]
    if float(scores.max()) > 0.6:
        assert label == labels[int(scores.argmax())]
        assert abs(float(scores.max()) - float(score)) < 0.1


# -- every model type of every task (slow) ------------------------------------------------------


def offered_types() -> list[tuple[str, str]]:
    from benchmarks.export_latency import model_types
    from trainer.tasks import task_configs

    return [(task, t) for task in sorted(task_configs()) for t in model_types(task)]


@pytest.fixture(scope="module", params=offered_types(), ids="-".join)
def untrained_plan(request: pytest.FixtureRequest):
    """One model type's untrained network and export plan, built once for both formats (pytest
    runs a module-scoped parameter's tests together and then drops it, so the largest networks
    are built once and not all held at the same time). ``model.input_size: auto`` is settled as
    a training settles it when no image size can be read: the type's largest size."""
    from tests.typed import settings
    from trainer.data.input_size import auto_input_size
    from trainer.tasks import task_of

    task, model_type = request.param
    typed = settings(task, model_type)
    size = auto_input_size(None, typed.model, typed.task.input_stride)
    typed = typed.replace_in("model", input_size=list(size))
    labels = ["a", "b", "c"]
    network = task_of(typed).network(typed, labels, pretrained=None).eval()
    return task_of(typed).export_plan(network, typed, labels, [])


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_every_offered_model_type_exports(untrained_plan, fmt: str, tmp_path) -> None:
    """What the exporter's refusal promises: every model type conf/ offers exports to both
    formats (untrained networks: the architecture is what an exporter can or cannot follow)."""
    from trainer.export import Runner, as_arrays, write_model

    plan = untrained_plan
    write_model(plan, fmt, tmp_path / f"model.{fmt}")
    example = plan.example[:1]
    got = Runner(fmt, tmp_path / f"model.{fmt}")(example.numpy())
    with torch.no_grad():
        expected = as_arrays(plan.network(example))
    assert [a.shape[1:] for a in got] == [a.shape[1:] for a in expected]
