"""Detection images and transforms (boxes follow the pixels), the five detectors, and a tiny
real training of the smallest one through a plain Lightning Trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from evaluation.detection import detection_evaluations, mean_average_precision
from trainer.errors import UserError
from trainer.tasks.object_detection.data import Box, DetectionItem, read_detection_dataset
from trainer.tasks.object_detection.demo import write_detection_shapes
from trainer.tasks.object_detection.images import (
    DetectionImages,
    collate_detection,
    detection_eval_transform,
    detection_train_transform,
    make_detection_loader,
)
from trainer.tasks.object_detection.module import (
    ObjectDetector,
    ServingDetector,
    normalized_detections,
)
from trainer.tasks.object_detection.networks import build_detector, detectors
from trainer.tasks.object_detection.predict import detection_record

# A 100 x 50 picture, black but for a white block at x 20..40, y 10..30 (pixels).
WIDTH, HEIGHT = 100, 50
BLOCK = Box("block", 0.2, 0.2, 0.4, 0.6)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for these tests: on a busy 2-core machine two threads spin against
    other processes, and a step of these small convolutions took 10 times longer."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def block_item(tmp_path_factory: pytest.TempPathFactory) -> DetectionItem:
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[10:30, 20:40] = 255
    path = tmp_path_factory.mktemp("block") / "block.png"
    Image.fromarray(pixels).save(path)
    return DetectionItem(path, "TRAIN", "block.png", (BLOCK,))


def _white_extent(image: torch.Tensor) -> list[float]:
    """x_min, y_min, x_max, y_max (pixel edges) of the bright pixels."""
    ys, xs = torch.nonzero(image.mean(dim=0) > 0.5, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_eval_transform_resizes_boxes_with_the_image(block_item: DetectionItem) -> None:
    images = DetectionImages([block_item], ["block"], detection_eval_transform((64, 64)))
    image, target = images[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert image.min() >= 0.0 and image.max() <= 1.0  # the detectors normalize themselves
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    # 0.2..0.4 of 64 wide, 0.2..0.6 of 64 high
    assert target["boxes"].numpy() == pytest.approx(np.array([[12.8, 12.8, 25.6, 38.4]]))
    assert target["labels"].tolist() == [1] and target["labels"].dtype == torch.int64
    assert _white_extent(image) == pytest.approx(target["boxes"][0].tolist(), abs=1.5)


def test_eval_transform_takes_a_bare_image_for_prediction(block_item: DetectionItem) -> None:
    with Image.open(block_item.path) as image:
        pixels = detection_eval_transform((32, 48))(image.convert("RGB"))
    assert pixels.shape == (3, 32, 48) and pixels.dtype == torch.float32


def test_train_transform_flips_boxes_with_the_pixels(block_item: DetectionItem) -> None:
    images = DetectionImages([block_item], ["block"], detection_train_transform((48, 96)))
    lefts = set()
    for seed in range(8):
        torch.manual_seed(seed)
        image, target = images[0]
        assert image.shape == (3, 48, 96)
        box = target["boxes"][0].tolist()
        assert _white_extent(image) == pytest.approx(box, abs=1.5)
        lefts.add(round(box[0], 1))
    # unflipped the block starts at 0.2 * 96 = 19.2; flipped at (1 - 0.4) * 96 = 57.6
    assert lefts == {19.2, 57.6}


def test_negative_images_and_collate(block_item: DetectionItem) -> None:
    negative = DetectionItem(block_item.path, "TRAIN", "empty", ())
    images = DetectionImages([block_item, negative], ["block"], detection_eval_transform((32, 32)))
    batch_images, targets = collate_detection([images[0], images[1]])
    assert len(batch_images) == len(targets) == 2
    assert targets[1]["boxes"].shape == (0, 4) and targets[1]["labels"].shape == (0,)
    assert [t["image_id"] for t in targets] == [0, 1]


def test_sanitize_drops_boxes_that_vanish() -> None:
    transform = detection_train_transform((8, 8), horizontal_flip=False, colour_jitter=0)
    boxes = tv_tensors.BoundingBoxes(
        [[0.0, 0.0, 50.0, 50.0], [10.0, 10.0, 11.0, 11.0]], format="XYXY", canvas_size=(100, 100)
    )
    target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    _, result = transform(tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8)), target)
    assert result["labels"].tolist() == [1]  # the 1-pixel box became 0.08 pixel: dropped


def _classes(model: torch.nn.Module) -> int:
    """How many classes (background included) the detector's head predicts."""
    for path in ("roi_heads.box_predictor.cls_score.out_features", "head.classification_head"):
        value = model
        for name in path.split("."):
            value = getattr(value, name, None)
        if isinstance(value, int):
            return value
        if value is not None:  # SSD's scoring head calls it num_columns
            return getattr(value, "num_classes", None) or value.num_columns
    raise AssertionError(type(model).__name__)


@pytest.mark.parametrize("constructor", sorted(detectors()))
def test_detectors_build_from_scratch_for_our_labels(constructor: str) -> None:
    model = build_detector(constructor, num_labels=3, input_size=(96, 128))
    assert _classes(model) == 4  # three labels and the background
    assert (model.transform.min_size, model.transform.max_size) == ((96,), 128)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in norms)  # DESIGN.md: 0.01 never settles from scratch
    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 96, 128)])
    assert set(output) == {"boxes", "scores", "labels"}
    assert len(output["boxes"]) <= 100  # COCO's and AutoML's cap
    heads = getattr(model, "roi_heads", model)
    assert heads.detections_per_img == 100
    if len(output["labels"]):
        assert output["labels"].min() >= 1 and output["labels"].max() <= 3


def test_an_unknown_detector_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.constructor='resnet50' is not a detector"):
        build_detector("resnet50", 2, (64, 64))


class StepLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _trainer(steps: int, callbacks: list, root: Path) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        default_root_dir=root,
    )


def test_tiny_training_lowers_the_loss_and_reports_map(tmp_path: Path) -> None:
    write_detection_shapes(tmp_path / "shapes", images=40, size=64, seed=3)
    manifest = read_detection_dataset(tmp_path / "shapes")
    size = (64, 64)
    pl.seed_everything(0, verbose=False)

    def loader(split: str, transform, shuffle: bool):
        items = DetectionImages(manifest.split(split), manifest.labels, transform)
        return make_detection_loader(items, 8, 0, shuffle, seed=0)

    train = loader("TRAIN", detection_train_transform(size), True)
    test = loader("TEST", detection_eval_transform(size), False)
    detector = build_detector("ssdlite320_mobilenet_v3_large", len(manifest.labels), size)
    module = ObjectDetector(detector, len(manifest.labels), lr=3e-3, weight_decay=1e-4)
    steps = StepLosses()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers on tiny loaders
        trainer = _trainer(16, [steps], tmp_path)
        trainer.fit(module, train, loader("VALIDATE", detection_eval_transform(size), False))
        validation = {key: float(value) for key, value in trainer.callback_metrics.items()}
        results = trainer.test(module, test, verbose=False)[0]

    assert len(steps.losses) == 16
    assert np.mean(steps.losses[-4:]) < 0.7 * np.mean(steps.losses[:4]), steps.losses
    for key in ("val_map", "val_map_50"):
        assert 0.0 <= validation[key] <= 1.0
    assert set(results) >= {"test_map", "test_map_50", "test_map_75"}

    # The TEST pass keeps what the evaluation and the prediction records need.
    test_items = manifest.split("TEST")
    assert len(module.test_predictions) == len(module.test_targets) == len(test_items)
    for prediction, target, item in zip(
        module.test_predictions, module.test_targets, test_items, strict=True
    ):
        assert prediction["boxes"].min() >= 0.0 and prediction["boxes"].max() <= 1.0
        assert (prediction["labels"] >= 0).all()
        expected = np.array([b.as_tuple() for b in item.boxes]).reshape(-1, 4)
        assert target["boxes"].numpy() == pytest.approx(expected, abs=1e-5)
    evaluations = detection_evaluations(
        module.test_predictions, module.test_targets, manifest.labels
    )
    assert mean_average_precision(evaluations[0], 0.5) == pytest.approx(
        results["test_map_50"], abs=1e-6
    )
    first = module.test_predictions[0]
    record = detection_record(
        "x.png", first["boxes"].tolist(), first["labels"].tolist(), first["scores"].tolist(),
        manifest.labels, max_bounding_box_count=5,
    )  # fmt: skip
    assert len(record["annotations"]) <= 5

    # What MLflow serves: one tensor in, one out, the same detections, best first, padded.
    serving = ServingDetector(module.backbone).eval()
    images, _ = next(iter(test))
    with torch.no_grad():
        rows = serving(torch.stack(images).double())
    assert rows.shape == (len(images), 100, 6)
    found = len(first["scores"])
    assert (rows[0, found:] == -1).all()
    expected = first["scores"].sort(descending=True).values
    assert rows[0, :found, 4].numpy() == pytest.approx(expected.numpy(), abs=1e-5)


def test_resumed_training_takes_the_configured_learning_rate(tmp_path: Path) -> None:
    write_detection_shapes(tmp_path / "shapes", images=20, size=48, seed=5)
    manifest = read_detection_dataset(tmp_path / "shapes")
    items = DetectionImages(
        manifest.split("TRAIN"), manifest.labels, detection_eval_transform((48, 48))
    )
    loader = make_detection_loader(items, 8, 0, True, seed=0)

    def module(lr: float) -> ObjectDetector:
        detector = build_detector("ssdlite320_mobilenet_v3_large", len(manifest.labels), (48, 48))
        return ObjectDetector(detector, len(manifest.labels), lr=lr, weight_decay=1e-4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = _trainer(2, [], tmp_path)
        first.fit(module(1e-3), loader)
        checkpoint = tmp_path / "two_steps.ckpt"
        first.save_checkpoint(checkpoint)
        resumed_module = module(5e-4)
        resumed = _trainer(3, [], tmp_path)
        resumed.fit(resumed_module, loader, ckpt_path=checkpoint)
    assert resumed.global_step == 3
    # the network's weights sit under "backbone.", as the classifier's do (stored_model.py)
    keys = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert keys and all(key.startswith("backbone.") for key in keys)
    (group,) = resumed.optimizers[0].param_groups
    assert group["lr"] == 5e-4


def test_detections_are_float32_under_bf16_autocast() -> None:
    detector = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", 2, (64, 64))
    module = ObjectDetector(detector, 2, lr=1e-3, weight_decay=0.0).eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        exact = module.detect(images)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            raw = module(images)[0]
            checked = module.detect(images)[0]
    assert raw["boxes"].dtype == torch.bfloat16  # what torchvision gives under autocast
    assert checked["boxes"].dtype == checked["scores"].dtype == torch.float32
    assert torch.equal(checked["boxes"], exact["boxes"])


def test_normalized_detections_scale_clip_and_shift_labels() -> None:
    output = {
        "boxes": torch.tensor([[10.0, 5.0, 110.0, 25.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.5]),
    }
    result = normalized_detections(output, height=50, width=100)
    assert result["boxes"].numpy() == pytest.approx(np.array([[0.1, 0.1, 1.0, 0.5]]))
    assert result["labels"].tolist() == [1] and result["scores"].tolist() == [0.5]
