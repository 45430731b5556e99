"""Pretrained weights from the torch hub cache (checked, loaded, fine-tuned, recorded), the
``weights download`` verb, and ``model.input_size=auto``. Nothing is downloaded: the weights
files are made here from local networks, under the names torchvision gives them."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision import models

from tests.conftest import FAST, cli_in_process, read_json, run_dirs, run_trainer
from tests.typed import settings
from trainer.data.input_size import auto_input_size, median_size
from trainer.errors import UserError
from trainer.settings import Settings
from trainer.tasks.image_classification.demo import write_shapes
from trainer.tasks.image_classification.module import ImageClassifier
from trainer.tasks.image_classification.networks import build_backbone
from trainer.tasks.object_detection.networks import build_detector
from trainer.tasks.pretrained import (
    PRETRAINED_NAMES,
    cached_path,
    choose,
    torchvision_weights,
    write_project_weights,
)

SMALL = "mobilenet_v3_small"
WEIGHTS_NAME = "MobileNet_V3_Small_Weights.IMAGENET1K_V1"


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """An empty torch hub cache of this test's own."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def cfg_for(constructor: str = SMALL, model_type: str = "mobile-low-latency-1") -> Settings:
    chosen = settings("image_classification", model_type)
    return chosen.replace_in("model", constructor=constructor)


def imagenet_like(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return models.mobilenet_v3_small(num_classes=1000).state_dict()


def test_cached_weights_load_into_every_layer_but_the_labels_head(hub: Path) -> None:
    weights = torchvision_weights(SMALL)
    source = imagenet_like(seed=3)
    path = write_project_weights(source, weights)
    assert path == hub / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"  # torchvision's name
    chosen = choose("auto", weights, cfg_for())
    assert chosen is not None and chosen.name == WEIGHTS_NAME
    network = build_backbone(SMALL, 3, chosen)
    state = network.state_dict()
    loaded = getattr(network, PRETRAINED_NAMES)
    assert "features.0.0.weight" in loaded and not any(n.startswith("classifier.3") for n in loaded)
    assert torch.equal(state["features.0.0.weight"], source["features.0.0.weight"])
    assert torch.equal(state["features.12.0.weight"], source["features.12.0.weight"])
    assert state["classifier.3.weight"].shape == (3, 1024)  # our labels' head, fresh
    scratch = build_backbone(SMALL, 3, None)
    assert not torch.equal(
        scratch.state_dict()["features.0.0.weight"], source["features.0.0.weight"]
    )


def test_a_detector_starts_from_its_coco_weights_but_its_class_heads(hub: Path) -> None:
    constructor = "fasterrcnn_mobilenet_v3_large_320_fpn"
    weights = torchvision_weights(constructor)
    assert "COCO" in str(weights)
    torch.manual_seed(5)
    coco = build_detector(constructor, 90, (320, 320)).state_dict()  # 91 classes, as COCO's
    write_project_weights(coco, weights)
    chosen = choose("true", weights, cfg_for(constructor, "mobile-versatile-1"))
    detector = build_detector(constructor, 3, (128, 128), chosen)
    state, loaded = detector.state_dict(), getattr(detector, PRETRAINED_NAMES)
    key = "backbone.body.0.0.weight"
    assert key in loaded and torch.equal(state[key], coco[key])
    assert "roi_heads.box_predictor.cls_score.weight" not in loaded  # sized for our 3 labels


def test_a_file_that_fails_its_hash_is_refused_and_auto_trains_from_scratch(
    hub: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = torchvision_weights(SMALL)
    path = cached_path(weights)
    path.parent.mkdir(parents=True)
    torch.save(imagenet_like(seed=1), path)  # no sidecar: its SHA-256 must start with 047dcff4
    assert not hashlib.sha256(path.read_bytes()).hexdigest().startswith("047dcff4")
    with pytest.raises(UserError, match="does not match torchvision's hash 047dcff4") as refused:
        choose("true", weights, cfg_for())
    assert "python -m trainer weights download --task image_classification" in str(refused.value)
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert choose("auto", weights, cfg_for()) is None
    assert "training from scratch" in caplog.text
    # A sidecar vouches only for the file it was written with.
    write_project_weights(imagenet_like(seed=2), weights)
    torch.save(imagenet_like(seed=4), path)
    with pytest.raises(UserError, match="differs from the digest"):
        choose("true", weights, cfg_for())


def test_offline_and_not_cached(hub: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = torchvision_weights(SMALL)
    with caplog.at_level(logging.INFO, logger="trainer"):
        assert choose("auto", weights, cfg_for()) is None
    (line,) = [r.getMessage() for r in caplog.records if "pretrained" in r.getMessage()]
    assert "not in the local torch hub cache; training from scratch" in line
    assert choose("false", weights, cfg_for()) is None
    with pytest.raises(UserError, match="no weights for r2plus1d_small"):
        choose("true", None, cfg_for("r2plus1d_small"))


def test_weights_download_checks_the_hash_before_the_file_lands(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from trainer.tasks import pretrained

    served = tmp_path / "served"
    served.mkdir()
    torch.save(imagenet_like(seed=6), served / "weights.pth")
    digest = hashlib.sha256((served / "weights.pth").read_bytes()).hexdigest()
    good = served / f"mobilenet_v3_small-{digest[:8]}.pth"
    (served / "weights.pth").rename(good)
    bad = served / "mobilenet_v3_small-00000000.pth"
    bad.write_bytes(good.read_bytes())
    args = ("weights", "download", "--model-type", "mobile-low-latency-1")

    monkeypatch.setattr(pretrained, "weights_url", lambda weights: bad.as_uri())
    refused = cli_in_process(tmp_path, monkeypatch, capsys, *args)
    assert refused.returncode == 2 and "invalid hash value" in refused.stderr
    assert not list((hub / "checkpoints").glob("*.pth"))  # nothing half-written lands

    monkeypatch.setattr(pretrained, "weights_url", lambda weights: good.as_uri())
    fetched = cli_in_process(tmp_path, monkeypatch, capsys, *args)
    assert fetched.returncode == 0, fetched.stderr
    assert (hub / "checkpoints" / good.name).read_bytes() == good.read_bytes()
    weights = torchvision_weights(SMALL)
    assert choose("true", weights, cfg_for()) is not None  # its name's hash checks out
    again = cli_in_process(tmp_path, monkeypatch, capsys, *args)
    assert "already in" in again.stdout


def test_fine_tuning_warms_up_slows_the_pretrained_layers_and_survives_a_checkpoint(
    hub: Path, tmp_path: Path
) -> None:
    weights = torchvision_weights(SMALL)
    write_project_weights(imagenet_like(seed=3), weights)
    network = build_backbone(SMALL, 3, choose("true", weights, cfg_for()))
    module = ImageClassifier(network, 3, lr=1e-3, weight_decay=0.0, pretrained_lr_factor=0.1,
                             warmup_steps=4)  # fmt: skip
    rates: list[list[float]] = []

    class Rates(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            rates.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    data = TensorDataset(torch.randn(12, 3, 32, 32), torch.randint(0, 3, (12,)))
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Rates()],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2))
    fresh = [r[0] for r in rates]
    assert fresh[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and fresh[-1] == 1e-3
    assert all(pretrained == pytest.approx(head * 0.1) for head, pretrained in rates), rates
    # A resume, or a training further, builds the same two groups from the checkpoint alone.
    checkpoint = tmp_path / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = ImageClassifier(build_backbone(SMALL, 3, None), 3, lr=1e-3, weight_decay=0.0,
                              pretrained_lr_factor=0.1, warmup_steps=4)  # fmt: skip
    resumed.on_load_checkpoint(torch.load(checkpoint, weights_only=True))
    assert len(resumed.configure_optimizers().param_groups) == 2


def test_adamw_is_fused_on_the_cpu_also_when_resuming_a_checkpoint_that_was_not(
    tmp_path: Path,
) -> None:
    """torch's default AdamW on the CPU loops over the parameters in Python; a checkpoint's
    optimizer groups carry the kernel choice of the training that wrote it."""

    def train(steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
        module = ImageClassifier(build_backbone(SMALL, 3, None), 3, lr=1e-3, weight_decay=0.0)
        data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))
        trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=tmp_path)  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=2), ckpt_path=ckpt_path)
        return trainer

    first = train(2)
    assert all(group["fused"] for group in first.optimizers[0].param_groups)
    first.save_checkpoint(tmp_path / "old.ckpt")
    saved = torch.load(tmp_path / "old.ckpt", weights_only=True)
    for group in saved["optimizer_states"][0]["param_groups"]:
        group["fused"] = None  # as torch's default wrote it before
    torch.save(saved, tmp_path / "old.ckpt")
    resumed = train(4, tmp_path / "old.ckpt")
    assert resumed.global_step == 4
    assert all(group["fused"] for group in resumed.optimizers[0].param_groups)


def test_input_size_from_the_median_rounded_up_to_the_stride_within_the_types_sizes(
    tmp_path: Path,
) -> None:
    model = SimpleNamespace(largest_input_size=(128, 128), smallest_input_size=(32, 32))
    assert auto_input_size((40, 70), model, 32) == (64, 96)
    assert auto_input_size((20, 500), model, 32) == (32, 128)
    assert auto_input_size(None, model, 32) == (128, 128)
    for index, (width, height) in enumerate([(40, 30), (50, 30), (60, 90), (10, 10)]):
        Image.new("RGB", (width, height)).save(tmp_path / f"{index}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert median_size(sorted(tmp_path.iterdir())) == (30, 45)  # (height, width), one skipped


def test_a_training_starts_from_cached_weights_at_the_datas_size_and_records_both(
    tmp_path: Path, trainer_home: Path
) -> None:
    torch_home = tmp_path / "torch"
    torch.hub.set_dir(str(torch_home / "hub"))  # where the trainer's TORCH_HOME points
    try:
        write_project_weights(imagenet_like(seed=3), torchvision_weights(SMALL))
    finally:
        torch.hub.set_dir(str(Path(torch.hub.get_dir())))
    write_shapes(tmp_path / "data", per_label=12, size=40, seed=3)  # 40 px: auto makes 64
    # Every default of the model and its convergence: FAST's size and convergence metric left out.
    args = [arg for arg in FAST if not arg.startswith(("model.input_size", "task.convergence"))]
    env = {"TORCH_HOME": str(torch_home)}
    data = f"dataset.path={tmp_path / 'data'}"
    first = run_trainer(*args, data, "budget.train_budget_milli_node_hours=12",
                        cwd=tmp_path, home=trainer_home, env=env)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert "model.input_size=auto: 64x64 (the median TRAIN image is 40x40" in first.stderr
    assert f"pretrained: {WEIGHTS_NAME}, 140 of 142 parameter tensors" in first.stderr
    (run_dir,) = run_dirs(tmp_path)
    details = read_json(run_dir / "model_details.json")
    assert details["pretrainedWeights"] == WEIGHTS_NAME and details["inputSize"] == [64, 64]
    # Prediction and export read the settled size from the run directory (or the store).
    assert read_json(run_dir / "state.json")["config"]["model"]["input_size"] == [64, 64]
    metrics = read_json(run_dir / "metrics.json")
    assert set(metrics["setupSeconds"]) == {
        "opening the operation", "checking the dataset", "preparing data", "building the network",
    }  # fmt: skip
    assert all(seconds >= 0 for seconds in metrics["setupSeconds"].values())
    # Convergence followed the validation loss (conf/task/image_classification.yaml).
    callbacks = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    assert any("val_loss_smoothed" in key for key in callbacks if key.startswith("EarlyStopping"))
    # ... and so did the choice of the best model, whose accuracy is the one reported.
    kept = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["callbacks"]
    (best,) = [v for k, v in kept.items() if k.startswith("ModelCheckpoint")]
    assert best["monitor"] == "val_loss"
    assert metrics["best_val_accuracy"] == pytest.approx(best["reported_score"])
    # Training further keeps the base model's size and says what it started from.
    model_id = json.loads((run_dir / "model.json").read_text())["name"].rsplit("/", 1)[1]
    further = run_trainer(*args, data, f"base_model_id={model_id}",
                          "budget.train_budget_milli_node_hours=12", "display_name=further",
                          cwd=tmp_path, home=trainer_home, env=env)  # fmt: skip
    assert further.returncode == 0, further.stderr[-3000:]
    assert f"model.input_size=auto: 64x64 (base model {model_id}'s" in further.stderr
    (second,) = [d for d in run_dirs(tmp_path) if d != run_dir]
    assert read_json(second / "model_details.json")["pretrainedWeights"] == WEIGHTS_NAME


# About 45 s: `make test-all` runs it.
@pytest.mark.slow
def test_a_first_training_in_a_fresh_home_fits_a_10_milli_node_hour_budget(
    tmp_path: Path, tiny_shapes: Path
) -> None:
    """Every default, reserves included (budget.save_reserve_seconds=auto): a home with no
    measurement kept 40 s of a 36 s budget for recording and checkpoints, and was refused."""
    result = run_trainer(
        f"dataset.path={tiny_shapes}", "budget.min_milli_node_hours=1",
        "budget.train_budget_milli_node_hours=10", cwd=tmp_path, home=tmp_path / "fresh_home",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    meta = read_json(run_dir / "model.json")["imageClassificationModelMetadata"]
    assert int(meta["trainCostMilliNodeHours"]) <= 10
    assert (tmp_path / "fresh_home" / "work_seconds.json").is_file()  # the next one measures


def test_detection_and_video_tasks_read_their_typical_size_from_headers(tmp_path: Path) -> None:
    from tests.video_helpers import write_ramp_video
    from trainer.tasks.object_detection.data import read_detection_dataset
    from trainer.tasks.object_detection.demo import write_detection_shapes
    from trainer.tasks.object_detection.task import TASK as DETECTION
    from trainer.tasks.video_classification.data import frame_size

    csv = write_detection_shapes(tmp_path / "boxes", 20, 96, seed=1)
    manifest = read_detection_dataset(csv, check_files=False)
    assert DETECTION.typical_size(manifest) == (96, 96)
    assert frame_size(write_ramp_video(tmp_path / "ramp.mp4", size=48)) == (48, 48)
    assert frame_size(tmp_path / "boxes" / "dataset.csv") is None
