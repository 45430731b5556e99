"""Edge export through the CLI: each mobile type, verification, a broken export, the README
snippet run without this project or torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST, REPO, read_json, run_dirs, run_trainer
from tests.test_manage import cli, cli_json, one_line_error

MOBILE = ["mobile-low-latency-1", "mobile-versatile-1", "mobile-high-accuracy-1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trainer_home: Path, tiny_shapes: Path) -> tuple[Path, dict]:
    """One small model of each mobile type, trained in one Hydra multirun."""
    cwd = tmp_path_factory.mktemp("export")
    result = run_trainer(
        "-m", *FAST, f"dataset.path={tiny_shapes}", f"model_type={','.join(MOBILE)}",
        "budget.train_budget_milli_node_hours=8", cwd=cwd, home=trainer_home,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    models = [read_json(d / "model.json") for d in run_dirs(cwd)]
    by_type = {m["imageClassificationModelMetadata"]["modelType"]: m for m in models}
    assert sorted(by_type) == sorted(MOBILE)
    return cwd, by_type


def export(cwd: Path, model: dict, *extra: str) -> Path:
    result = cli(
        "models", "export", model["name"], "--output", str(cwd / "exports"), *extra, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip())


@pytest.fixture(scope="module")
def packages(trained) -> dict[str, Path]:
    cwd, models = trained
    return {model_type: export(cwd, models[model_type]) for model_type in MOBILE}


@pytest.mark.parametrize("model_type", MOBILE)
def test_each_mobile_type_exports_verified(trained, packages, model_type: str) -> None:
    cwd, models = trained
    model = models[model_type]
    package = packages[model_type]
    assert package.name.startswith(f"model-export-{model['displayName']}-")
    assert {p.name for p in package.iterdir()} == {"model.onnx", "labels.txt", "metadata.json"}
    meta = read_json(package / "metadata.json")
    assert meta["modelType"] == model_type and meta["modelId"] == model["name"].split("/")[1]
    assert meta["input_size"] == [32, 32]
    assert meta["verification"]["images"] > 0
    assert meta["verification"]["maxAbsDifference"] < 1e-4
    assert meta["latencyMs"]["median"] > 0 and meta["latencyMs"]["runs"] >= 50
    labels = (package / "labels.txt").read_text().split()
    assert labels == sorted(["circle", "square", "triangle", "cross", "stripes_h", "stripes_v"])

    exports = [
        op
        for op in cli_json("operations", "list", cwd=cwd)["operations"]
        if "exportModelDetails" in op["metadata"]
    ]
    details = [op["metadata"]["exportModelDetails"]["outputInfo"] for op in exports]
    assert {"outputDirectory": str(package)} in details


def test_torchscript_export(trained) -> None:
    cwd, models = trained
    package = export(cwd, models["mobile-low-latency-1"], "--format", "torchscript")
    meta = read_json(package / "metadata.json")
    assert (package / "model.pt").is_file() and meta["format"] == "torchscript"
    assert meta["verification"]["maxAbsDifference"] < 1e-4


def test_a_broken_export_fails_verification_and_leaves_nothing(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.export import ExportFailed, export_package
    from trainer.store.catalog import Catalog
    from trainer.stored_model import trained_model

    cwd, models = trained
    monkeypatch.chdir(cwd)
    catalog = Catalog(f"sqlite:///{cwd / 'mlflow.db'}", "vision-trainer")
    model = trained_model(catalog, models["mobile-low-latency-1"]["name"], "export")
    output = tmp_path / "exports"
    # Exported for 40x48 inputs, verified with the model's own 32x32 TEST images.
    with pytest.raises(ExportFailed, match="failed on the TEST images|differ"):
        export_package(model, "onnx", output, export_size=[40, 48])
    assert list(output.iterdir()) == []


def test_unknown_model_and_format(trained) -> None:
    cwd, _ = trained
    assert "ICN404" in one_line_error(cli("models", "export", "ICN404", cwd=cwd))
    bad = cli("models", "export", "ICN404", "--format", "tflite", cwd=cwd)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- snippet: classify.py -->")[1].split("<!-- end snippet -->")[0]
    return block.split("```python")[1].split("```")[0]


def test_readme_snippet_classifies_with_the_package_alone(
    trained, packages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd, models = trained
    model = models["mobile-low-latency-1"]
    package = packages["mobile-low-latency-1"]
    script = tmp_path / "classify.py"
    script.write_text(
        readme_snippet()
        + "\nassert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer')]\n"
    )
    state = read_json(next(d for d in run_dirs(cwd) if (d / "model.json").is_file()) / "state.json")
    from trainer.data.manifest import TEST, read_dataset

    item = read_dataset(state["config"]["dataset"]["path"]).split(TEST)[0]
    env = {"PATH": os.environ["PATH"]}  # no PYTHONPATH: nothing of the project on the path
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(package), str(item.path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    label, score = result.stdout.split()
    labels = (package / "labels.txt").read_text().split()
    assert label in labels and 0 < float(score) <= 1

    # The same image through the trained model, as the trainer's evaluation prepares it.
    import torch
    from PIL import Image

    from trainer.data.images import eval_transform
    from trainer.store.catalog import Catalog
    from trainer.stored_model import load_network, trained_model

    monkeypatch.chdir(cwd)
    trained_record = trained_model(
        Catalog("sqlite:///mlflow.db", "vision-trainer"), model["name"], "export"
    )
    network = load_network(trained_record)
    cfg = trained_record.config
    transform = eval_transform(cfg["model"]["input_size"], cfg["data"]["mean"], cfg["data"]["std"])
    with Image.open(item.path) as image, torch.no_grad():
        scores = network(transform(image.convert("RGB"))[None]).softmax(1)[0]
    assert abs(float(scores.max()) - float(score)) < 0.05  # Pillow's resize, not torchvision's
    if float(scores.max()) > 0.6:
        assert label == labels[int(scores.argmax())]
    assert json.loads((package / "metadata.json").read_text())["resize"].startswith("resize")
