"""Turning detection manifest items into (image, target) pairs for torchvision's detectors.

Boxes travel with their image through torchvision.transforms.v2 as tv_tensors.BoundingBoxes, so
resizing and flipping move them too. Every image is resized to the model's input size (no crop,
as for classification); pixels stay in [0, 1] because the detectors normalize internally
(networks.py). Labels are 1-based: 0 is the detectors' background class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainer.data.images import make_loader
from trainer.tasks.object_detection.data import DetectionItem

Target = dict[str, Any]


def detection_eval_transform(size: Sequence[int]) -> v2.Compose:
    """Evaluation and prediction: resize only. It takes an image alone too (prediction), and
    keeps every true box, however small, so that evaluation counts them all."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(tuple(size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def detection_train_transform(
    size: Sequence[int], horizontal_flip: bool = True, colour_jitter: float = 0.2
) -> v2.Compose:
    """Resize, flip (boxes follow), a mild colour jitter; ``colour_jitter=0`` turns it off."""
    steps: list = [v2.ToImage(), v2.Resize(tuple(size), antialias=True)]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    if colour_jitter > 0:
        amount = colour_jitter
        steps.append(v2.ColorJitter(amount, amount, amount, hue=min(amount / 4, 0.5)))
    # Sanitize last: it drops boxes that a transform made degenerate, with their labels.
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


class DetectionImages(Dataset):
    """Items as (float image in [0, 1], target) with target ``boxes`` (pixels of the transformed
    image, XYXY), ``labels`` (int64, 1 + index in ``labels``) and ``image_id`` (the index)."""

    def __init__(
        self, items: Sequence[DetectionItem], labels: Sequence[str], transform: v2.Compose
    ) -> None:
        self.items = list(items)
        self.class_of = {label: index + 1 for index, label in enumerate(labels)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        item = self.items[index]
        with Image.open(item.path) as file:
            image = file.convert("RGB")
        return self.transform(image, self.target(item, image.width, image.height, index))

    def target(self, item: DetectionItem, width: int, height: int, index: int) -> Target:
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        normalized = torch.tensor([box.as_tuple() for box in item.boxes], dtype=torch.float32)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                normalized.reshape(-1, 4) * scale, format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor([self.class_of[b.label] for b in item.boxes], dtype=torch.int64),
            "image_id": index,
        }


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists rather than stacked tensors: the detectors take a list of images and targets."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def make_detection_loader(
    dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int
) -> DataLoader:
    return make_loader(
        dataset, batch_size, num_workers, shuffle, seed, collate_fn=collate_detection
    )
