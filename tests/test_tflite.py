"""TF Lite packages (trainer/tflite.py): float and int8 classifiers and an SSDlite detector from
short trainings, each run by LiteRT alone in a process that imports neither torch nor this
project (``python -I``), and compared with the PyTorch model; the refusals' one lines."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import FAST, REPO, Trained, read_json, run_trainer, train
from tests.test_export import check_export_operation, readme_snippet, stored
from tests.test_manage import cli, one_line_error
from trainer.data.manifest import TEST

MODEL_TYPE = "mobile-low-latency-1"
FILES = {"model.tflite", "dict.txt", "tflite_metadata.json", "metadata.json"}

# Runs a package's model.tflite on .npy inputs with LiteRT alone; prints each output as JSON.
LITERT_ALONE = """
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
runner = Interpreter(model_path=sys.argv[1]).get_signature_runner()
(name,) = runner.get_input_details()
for path in sys.argv[2:]:
    outputs = runner(**{name: np.load(path)})
    ordered = sorted(outputs, key=lambda n: int(n.rsplit("_", 1)[1]))
    print(json.dumps([outputs[n].tolist() for n in ordered]))
assert not any(m == "torch" or m.startswith(("torch.", "trainer")) for m in sys.modules)
"""


def export(cwd: Path, model: dict, *extra: str) -> Path:
    """``models export --format tflite``: a conversion takes tens of seconds on a busy CPU."""
    result = run_trainer("models", "export", model["name"], "--output", str(cwd / "exports"),
                         "--format", "tflite", *extra, cwd=cwd, home=cwd, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip())


def litert_alone(package: Path, inputs: list[np.ndarray], folder: Path) -> list[list[np.ndarray]]:
    """Each input's outputs, from a ``python -I`` process with LiteRT and NumPy alone."""
    paths = []
    for index, array in enumerate(inputs):
        paths.append(folder / f"input{index}.npy")
        np.save(paths[-1], array)
    done = subprocess.run(
        [sys.executable, "-I", "-c", LITERT_ALONE, str(package / "model.tflite"), *map(str, paths)],
        capture_output=True, text=True, timeout=300, cwd=folder,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [[np.array(o) for o in json.loads(line)] for line in done.stdout.splitlines()]


def check_tflite_package(package: Path, model: dict, inference: str) -> dict:
    assert {p.name for p in package.iterdir()} == FILES
    meta = read_json(package / "metadata.json")
    assert meta["format"] == "tflite" and meta["modelId"] == model["name"].rsplit("/", 1)[1]
    assert meta["producedBy"].startswith("litert-torch")
    assert meta["latencyMs"]["median"] > 0 and "LiteRT" in meta["latencyMs"]["runtime"]
    lite = read_json(package / "tflite_metadata.json")
    assert lite["inferenceType"] == inference
    assert lite["inputTensor"]["type"] == "uint8" and lite["inputShape"][-1] == 3
    return meta


@pytest.fixture(scope="module")
def edge_shapes(tmp_path_factory) -> Path:
    """The demo shapes with 192 TEST images (32 a label) beside 20 TRAIN and 4 VALIDATE ones a
    label: the int8 rule's 95% agreement then allows nine flips and its 2 points of accuracy a
    net loss of three images (with 96, a loss of two, 2.1 points, failed a CI run), and the
    TEST images cost the training nothing."""
    from trainer.tasks.image_classification.demo import LABELS, write_shapes

    folder = tmp_path_factory.mktemp("edge_shapes")
    write_shapes(folder, per_label=56, size=64, seed=7)
    splits = ["TRAIN"] * 20 + ["VALIDATE"] * 4 + ["TEST"] * 32
    rows = [f"{split},{label}/{label}_{index:04d}.png,{label}"
            for label in LABELS for index, split in enumerate(splits)]  # fmt: skip
    (folder / "edge.csv").write_text("\n".join(rows) + "\n")
    return folder / "edge.csv"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, trainer_home: Path, edge_shapes: Path) -> Trained:
    """MobileNetV3-Small trained until it converges: int8 is judged against the float model's
    top label, which a barely trained model (near-equal logits) gives no margin for."""
    cwd = tmp_path_factory.mktemp("edge")
    model, run_dir = train(
        cwd, trainer_home, *FAST, f"dataset.path={edge_shapes}", f"model_type={MODEL_TYPE}",
        "display_name=edge", "model.input_size=[64,64]", "budget.train_budget_milli_node_hours=15",
        # Past the first plateaus: a model barely above chance has near-equal logits.
        "early_stopping.patience=12", "early_stopping.patience_before_first_gain=12",
    )  # fmt: skip
    return Trained(cwd, {MODEL_TYPE: model}, {MODEL_TYPE: run_dir})


@pytest.fixture(scope="module")
def float_package(classifier: Trained) -> Path:
    return export(classifier.cwd, classifier.models[MODEL_TYPE])


def edge_inputs(trained, count: int = 8) -> list[tuple[np.ndarray, int]]:
    """TEST images as the package takes them, with their label index."""
    from trainer.data.images import uint8_pixels

    size = trained.settings.model.size
    items = trained.manifest().split(TEST)[:count]
    return [(uint8_pixels(item.path, size), trained.labels.index(item.label)) for item in items]


def pytorch_logits(trained, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from trainer.stored_model import load_network
    from trainer.tasks.image_classification.export import PixelsIn

    settings = trained.settings
    wrapped = PixelsIn(load_network(trained), settings.data.mean, settings.data.std).eval()
    with torch.no_grad():
        return [wrapped(torch.from_numpy(x)).numpy() for x in inputs]


@pytest.mark.slow
def test_a_float_package_gives_the_pytorch_models_logits_in_litert_alone(
    classifier: Trained, float_package: Path, tmp_path: Path, monkeypatch
) -> None:
    model = classifier.models[MODEL_TYPE]
    meta = check_tflite_package(float_package, model, "FLOAT")
    assert meta["quantize"] == "none" and meta["verification"]["top1Disagreements"] == 0
    trained = stored(classifier, model, monkeypatch)
    assert (float_package / "dict.txt").read_text().split() == trained.labels
    inputs = [x for x, _ in edge_inputs(trained)]
    got = litert_alone(float_package, inputs, tmp_path)
    for (have,), want in zip(got, pytorch_logits(trained, inputs), strict=True):
        assert have.argmax() == want.argmax()
        assert np.abs(have - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))
    check_export_operation(classifier.cwd, float_package, "image_classification")


@pytest.fixture(scope="module")
def int8_package(classifier: Trained) -> Path:
    return export(classifier.cwd, classifier.models[MODEL_TYPE], "--quantize", "int8")


@pytest.mark.slow
def test_an_int8_package_is_full_integer_smaller_and_agrees_with_pytorch_in_litert_alone(
    classifier: Trained, float_package: Path, int8_package: Path, tmp_path: Path, monkeypatch
) -> None:
    model = classifier.models[MODEL_TYPE]
    meta = check_tflite_package(int8_package, model, "QUANTIZED_INT8")
    verification = meta["verification"]
    assert meta["quantize"] == "int8" and verification["testImages"] == 192
    assert verification["top1AgreementWithFloat"] >= 0.95
    assert verification["floatTestAccuracy"] - verification["int8TestAccuracy"] <= 0.02
    # The target for the mobile types: int8 at most 0.3 of the float file's size.
    size = (int8_package / "model.tflite").stat().st_size
    assert size == meta["sizeBytes"] <= 0.3 * (float_package / "model.tflite").stat().st_size
    lite = read_json(int8_package / "tflite_metadata.json")
    assert lite["inputTensor"]["type"] == "uint8"  # pixels as they are, as for float
    (output,) = lite["outputTensors"]
    assert output["type"] == "int8" and output["quantization"]["scale"] > 0

    # LiteRT alone, the logits dequantized with the metadata's scale and zero point as an app
    # does, against the PyTorch model on every TEST image.
    trained = stored(classifier, model, monkeypatch)
    inputs, truth = zip(*edge_inputs(trained, 192), strict=True)
    scale, zero_point = output["quantization"]["scale"], output["quantization"]["zeroPoint"]
    got = [(have - zero_point) * scale for (have,) in litert_alone(int8_package, inputs, tmp_path)]
    expected = pytorch_logits(trained, list(inputs))
    agree = [int(h.argmax()) == int(w.argmax()) for h, w in zip(got, expected, strict=True)]
    assert np.mean(agree) == verification["top1AgreementWithFloat"]
    int8_right = np.mean([int(h.argmax()) == t for h, t in zip(got, truth, strict=True)])
    assert int8_right == verification["int8TestAccuracy"]
    # Quantization moves single logits by up to a quarter of their scale (seen in CI: 3.4 of
    # 13.8); on average by a few percent (0.25 there).
    scale_of_logits = max(float(np.abs(w).max()) for w in expected)
    differences = [np.abs(h - w).mean() for h, w in zip(got, expected, strict=True)]
    assert float(np.mean(differences)) < 0.1 * scale_of_logits
    check_export_operation(classifier.cwd, int8_package, "image_classification")


def test_the_int8_rule_keeps_or_refuses_saying_by_how_much() -> None:
    from trainer.tflite import judge_int8

    float_logits = [[np.eye(3)[i % 3][None]] for i in range(20)]
    truth = [i % 3 for i in range(20)]
    figures, problem = judge_int8(float_logits, float_logits, truth)
    assert problem is None and figures["top1AgreementWithFloat"] == 1.0
    one_flip = [*float_logits[:19], [np.eye(3)[0][None]]]  # 19 of 20 agree: 95%
    figures, problem = judge_int8(float_logits, one_flip, truth)
    assert problem is not None and "TEST accuracy is 5.0 points below" in problem
    two_flips = [*float_logits[:18], [np.eye(3)[2][None]], [np.eye(3)[0][None]]]
    _, problem = judge_int8(float_logits, two_flips, truth)
    assert (
        problem == "the int8 model agrees with the float one on 90.0% of TEST images' top "
        "label, below 95%"
    )


def test_a_multilabel_models_int8_rule_judges_its_label_sets() -> None:
    """A MULTILABEL model decides a set of labels (those scored 0.5 and over: logits of 0 and
    more): int8 must give the float model's set, and lose little exact-match accuracy."""
    from trainer.tasks.image_classification.export import LABEL_SET
    from trainer.tflite import judge_int8

    sets = [frozenset(label for label in range(3) if (i >> label) & 1) for i in range(20)]

    def logits(labels: frozenset) -> list[np.ndarray]:
        return [np.array([[1.5 if label in labels else -0.1 for label in range(3)]])]

    float_logits = [logits(labels) for labels in sets]
    figures, problem = judge_int8(float_logits, float_logits, sets, LABEL_SET)
    assert problem is None
    assert figures == {"labelSetAgreementWithFloat": 1.0, "floatTestExactMatch": 1.0,
                       "int8TestExactMatch": 1.0, "testImages": 20}  # fmt: skip
    # Image 0 (no label) gets label 2 at 0.52 (a logit of 0.1 where float gave -0.1).
    one_flip = [logits(frozenset({2})), *float_logits[1:]]
    figures, problem = judge_int8(float_logits, one_flip, sets, LABEL_SET)
    assert figures["labelSetAgreementWithFloat"] == 0.95
    assert problem == (
        "the int8 model's TEST exact label-set match is 5.0 points below the float model's "
        "(95.0% against 100.0%), more than 2"
    )
    two_flips = [*one_flip[:19], logits(sets[19] - {0})]
    _, problem = judge_int8(float_logits, two_flips, sets, LABEL_SET)
    assert problem == (
        "the int8 model agrees with the float one on 90.0% of TEST images' label set (the "
        "labels scored 0.5 and over), below 95%"
    )


@pytest.mark.slow
def test_an_int8_export_that_misses_the_rule_fails_in_one_line_and_leaves_nothing(
    classifier: Trained, int8_package: Path, tmp_path: Path, monkeypatch
) -> None:
    from trainer import tflite
    from trainer.errors import UserError
    from trainer.export import export_package

    trained = stored(classifier, classifier.models[MODEL_TYPE], monkeypatch)
    limits = {**tflite.tflite_defaults(), "int8_min_top1_agreement": 1.01}  # none can meet it
    monkeypatch.setattr(tflite, "tflite_defaults", lambda: limits)

    # The conversion is the package's (the same calibration): the export's judging is tested.
    def converted(plan, quantize: str, path: Path) -> str:
        shutil.copy(int8_package / "model.tflite", path)
        return "the fixture's conversion"

    monkeypatch.setattr(tflite, "convert", converted)
    with pytest.raises(UserError) as refusal:
        export_package(trained, "tflite", tmp_path / "out", quantize="int8")
    (line,) = str(refusal.value).splitlines()
    assert "of TEST images' top label, below 101%; the export was discarded" in line
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_the_readme_snippet_classifies_with_litert_alone(
    classifier: Trained, float_package: Path, tmp_path: Path, monkeypatch
) -> None:
    trained = stored(classifier, classifier.models[MODEL_TYPE], monkeypatch)
    item = trained.manifest().split(TEST)[0]
    (tmp_path / "tflite_classify.py").write_text(readme_snippet("tflite_classify.py"))
    done = subprocess.run(
        [sys.executable, "-I", "tflite_classify.py", str(float_package), str(item.path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    label, score = done.stdout.split()
    (logits,) = pytorch_logits(trained, [edge_inputs(trained, 1)[0][0]])
    scores = torch.from_numpy(logits).softmax(1)[0]
    # The snippet resizes with Pillow, the model's eval with torchvision: scores come close.
    assert abs(float(scores.max()) - float(score)) < 0.05
    if float(scores.max()) > 0.6:
        assert label == trained.labels[int(scores.argmax())]


@pytest.mark.slow
def test_a_detector_package_gives_the_models_boxes(
    detection_model: Trained, tmp_path: Path, monkeypatch
) -> None:
    cwd, _, model, _ = detection_model.only()
    package = export(cwd, model)
    meta = check_tflite_package(package, model, "FLOAT")
    verification = meta["verification"]
    assert verification["detectionsCompared"] > 0
    assert verification["maxBoxDifferencePixels"] <= verification["pixelTolerance"] == 1.0
    lite = read_json(package / "tflite_metadata.json")
    post = lite["postprocessing"]
    assert post["maxDetections"] == 100 and 0 < post["nmsIouThreshold"] < 1

    # LiteRT alone, then the package's NumPy post-processing run from its file as it is.
    from trainer.data.images import uint8_pixels
    from trainer.stored_model import load_network
    from trainer.tasks.object_detection.export import ExportedDetector

    trained = stored(detection_model, model, monkeypatch)
    item = trained.manifest().split(TEST)[0]
    image = uint8_pixels(item.path, trained.settings.model.size)
    (outputs,) = litert_alone(package, [image], tmp_path)
    code = (REPO / "trainer/tasks/object_detection/ssd_postprocess.py").read_text()
    found: dict = {}
    exec(compile(code, "ssd_postprocess.py", "exec"), found)  # noqa: S102 (the project's file)
    boxes, scores, labels = found["postprocess"](outputs, post)
    with torch.no_grad():
        tensor = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
        want_boxes, want_scores, want_labels = ExportedDetector(load_network(trained))(tensor)
    height, width = trained.settings.model.size
    pixels_of = np.array([width, height, width, height])
    confident = want_scores.numpy() > 0.1
    assert confident.any()
    for box, score, label in zip(want_boxes.numpy()[confident], want_scores.numpy()[confident],
                                 want_labels.numpy()[confident], strict=True):  # fmt: skip
        same = (labels == label) & (np.abs(scores - score) < 1e-3)
        assert same.any() and (np.abs(boxes[same] - box) * pixels_of).max(axis=1).min() <= 1.0


def test_a_two_stage_detector_is_refused_naming_the_types_that_export() -> None:
    from tests.typed import settings
    from trainer.errors import UserError
    from trainer.tasks import task_of
    from trainer.tflite import tflite_defaults

    typed = settings("object_detection", "mobile-versatile-1")
    with pytest.raises(UserError) as refusal:
        task_of(typed).tflite_plan(None, typed, ["a"], [], [], "none", tflite_defaults())
    (line,) = str(refusal.value).splitlines()
    assert "model.constructor=fasterrcnn_mobilenet_v3_large_320_fpn" in line
    assert "non-maximum suppression inside the network" in line
    assert line.endswith("export to TF Lite are ssdlite320_mobilenet_v3_large")


def test_refused_formats_say_why_in_one_line(tmp_path: Path) -> None:
    # The format is checked before the model is looked up: no model is needed.
    line = one_line_error(cli("models", "export", "ICN1", "--format", "tf_js", cwd=tmp_path))
    assert "modelFormat 'tf_js' is not offered here" in line
    assert line.endswith("the formats offered are onnx, torchscript, tflite, docker")
    line = one_line_error(cli("models", "export", "ICN1", "--format", "edgetpu_tflite",
                              cwd=tmp_path))  # fmt: skip
    assert "Edge TPU compiler" in line
    line = one_line_error(cli("models", "export", "ICN1", "--format", "pt", cwd=tmp_path))
    assert line.startswith("error: modelFormat 'pt' is not a format; the formats offered are")


@pytest.mark.slow
def test_without_the_extra_the_export_names_it_in_one_line(
    classifier: Trained, tmp_path: Path
) -> None:
    cwd, model = classifier.cwd, classifier.models[MODEL_TYPE]
    # Without litert-torch (a module of that name that fails to import, first on the path).
    hidden = tmp_path / "hidden" / "litert_torch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = run_trainer(
        "models", "export", model["name"], "--format", "tflite", "--output", str(tmp_path / "out"),
        cwd=cwd, home=cwd, env={"PYTHONPATH": f"{hidden.parent}{os.pathsep}{REPO}"},
    )  # fmt: skip
    assert "pip install 'vision-trainer[tflite]'" in one_line_error(done)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_video_classifier_exports_in_float_with_the_same_top_label(video_model: Trained) -> None:
    cwd, _, model, _ = video_model.only()
    package = export(cwd, model)
    meta = read_json(package / "metadata.json")
    assert meta["task"] == "video_classification" and meta["quantize"] == "none"
    assert meta["verification"]["inputs"] > 0 and meta["verification"]["top1Disagreements"] == 0
    lite = read_json(package / "tflite_metadata.json")
    assert lite["inputTensor"]["type"] == "float32" and lite["inputShape"][:2] == [1, 3]
    assert "one clip a call" in lite["layout"]


@pytest.mark.parametrize("constructor", ["mobilenet_v3_small", "efficientnet_b0"])
def test_the_network_rewritten_for_int8_computes_the_same_function(constructor: str) -> None:
    import torchvision

    from benchmarks.export_latency import trained_like
    from trainer.tflite import LinearSqueezeExcitation, quantization_friendly

    torch.manual_seed(0)
    network = trained_like(getattr(torchvision.models, constructor)(num_classes=5).eval())
    rewritten = quantization_friendly(copy.deepcopy(network))
    kinds = {type(m) for m in rewritten.modules()}
    assert LinearSqueezeExcitation in kinds
    assert not kinds & {torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.SiLU}
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(images), network(images), rtol=1e-4, atol=1e-5)
