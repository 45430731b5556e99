"""Turning manifest items into tensors: the training augmentation and the evaluation transform.

Evaluation and prediction resize the whole image to the model's input size (no crop), scale to
[0, 1] and normalize; exported models document the same rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from trainer.data import Item


def eval_transform(size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(tuple(size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def train_transform(
    size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: Sequence[float],
    horizontal_flip: bool,
) -> v2.Compose:
    steps: list = [v2.ToImage(), v2.RandomResizedCrop(tuple(size), scale=tuple(crop_scale))]
    if horizontal_flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class LabelledImages(Dataset):
    def __init__(self, items: Sequence[Item], labels: Sequence[str], transform: v2.Compose) -> None:
        self.items = list(items)
        self.index_of = {label: i for i, label in enumerate(labels)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        with Image.open(item.path) as image:
            pixels = self.transform(image.convert("RGB"))
        return pixels, self.index_of[item.label]


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool, seed: int
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        drop_last=False,
    )
