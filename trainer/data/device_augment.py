"""Training augmentation on batches on the device, for images read from the decoded-image cache.

The CPU pipeline (``images.train_transform``) crops each decoded image with
``v2.RandomResizedCrop``, flips it and normalizes it. Here the same happens to a whole uint8 batch
at once on the model's device: the crop boxes are drawn exactly as torchvision draws them, in the
pixel grid of each *original* image (the cache keeps its size), so that crop areas and aspect
ratios have the same distribution although the cache stored every image at one fixed size; one
``grid_sample`` then crops, resizes and flips the batch.

The cache stores training images at the input size times a margin (at most ``MAX_MARGIN``), so a
crop is at most that much larger than the model's input and bilinear resampling without
antialiasing stays close to torchvision's antialiased resize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

RATIO = (3 / 4, 4 / 3)  # v2.RandomResizedCrop's default aspect-ratio range
ATTEMPTS = 10  # as torchvision: ten tries at a crop, then a centre crop


@dataclass
class DevicePlan:
    """What the LightningModule does on the device; it finds this on its training data set."""

    augment: DeviceAugment | None = None  # set when training batches are cached uint8 images
    channels_last: bool = False
    compile: bool = False
    compile_reserve_seconds: float = 180.0  # what a compile may take, kept free in the budget
    batch_size: int = 32
    input_size: tuple[int, int] = (224, 224)


class DeviceAugment:
    """Random resized crop, horizontal flip and normalization of a uint8 (B, H, W, 3) batch."""

    def __init__(
        self,
        size: Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: Sequence[float],
        horizontal_flip: bool,
    ) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.mean, self.std = list(mean), list(std)
        self.scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.horizontal_flip = horizontal_flip
        # Per device, made once: a tensor built from a list each step would be a blocking copy
        # to the GPU, which would stop the CPU from running ahead of it.
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self,
        images: torch.Tensor,
        source_hw: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``images``: uint8 (B, H, W, 3), as the cache stores them (so that pinning and copying
        a batch are plain copies); ``source_hw``: each original image's (height, width).
        Returns normalized float (B, 3, h, w) batches at the input size."""
        images = images.permute(0, 3, 1, 2)  # a channels_last view: no copy
        boxes = crop_boxes(source_hw.to(images.device), self.scale, RATIO, generator)
        flips = torch.zeros(len(images), dtype=torch.bool, device=images.device)
        if self.horizontal_flip:
            flips = torch.rand(len(images), device=images.device, generator=generator) < 0.5
        cropped = resized_crop(images, boxes, flips, self.size)
        if images.device not in self._stats:
            self._stats[images.device] = (
                torch.tensor(self.mean, device=images.device),
                torch.tensor(self.std, device=images.device),
            )
        return normalize(cropped, *self._stats[images.device])


def crop_boxes(
    source_hw: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RATIO,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop boxes (x0, y0, x1, y1) as fractions of each image, drawn as RandomResizedCrop does.

    torchvision tries ten times to draw an area fraction uniformly from ``scale`` and an aspect
    ratio log-uniformly from ``ratio``, rounds width and height to whole pixels, keeps the first
    that fits and places it uniformly; when none fits it takes the largest centred crop whose
    ratio is in range. The same arithmetic, vectorised over the batch and the ten tries.
    """
    device = source_hw.device
    height = source_hw[:, 0].double().unsqueeze(1)
    width = source_hw[:, 1].double().unsqueeze(1)
    shape = (len(source_hw), ATTEMPTS)

    def uniform(low: float, high: float) -> torch.Tensor:
        draw = torch.rand(shape, device=device, generator=generator, dtype=torch.float64)
        return low + (high - low) * draw

    area = height * width * uniform(*scale)
    aspect = torch.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # torch.randint(0, n) for each try: the floor of a uniform draw times n.
    top = torch.floor(uniform(0.0, 1.0) * (height - h + 1))
    left = torch.floor(uniform(0.0, 1.0) * (width - w + 1))

    first = fits.double().argmax(dim=1, keepdim=True)  # the first try that fits
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    w, h, top, left = pick(w), pick(h), pick(top), pick(left)
    found = fits.any(dim=1)
    cw, ch, ctop, cleft = _centre_crop(height.squeeze(1), width.squeeze(1), ratio)
    w, h = torch.where(found, w, cw), torch.where(found, h, ch)
    top, left = torch.where(found, top, ctop), torch.where(found, left, cleft)
    height, width = height.squeeze(1), width.squeeze(1)
    boxes = torch.stack([left / width, top / height, (left + w) / width, (top + h) / height], 1)
    return boxes.float()


def _centre_crop(
    height: torch.Tensor, width: torch.Tensor, ratio: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    in_ratio = width / height
    w, h = width.clone(), height.clone()
    narrow, wide = in_ratio < ratio[0], in_ratio > ratio[1]
    h = torch.where(narrow, torch.round(width / ratio[0]), h)
    w = torch.where(wide, torch.round(height * ratio[1]), w)
    return (
        w,
        h,
        torch.div(height - h, 2, rounding_mode="floor"),
        torch.div(width - w, 2, rounding_mode="floor"),
    )


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Crop each image to its box (fractions), resize to ``size``, mirror where ``flips``.

    Bilinear with half-pixel centres, as torchvision's resize; the result is rounded to whole
    intensity levels like the uint8 CPU pipeline, and scaled to [0, 1].
    """
    x0, y0, x1, y1 = boxes.unbind(1)
    # grid_sample's coordinates run from -1 to 1 across the image's outer pixel edges.
    scale_x, scale_y = x1 - x0, y1 - y0
    scale_x = torch.where(flips, -scale_x, scale_x)
    theta = torch.zeros(len(images), 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = scale_x, x0 + x1 - 1
    theta[:, 1, 1], theta[:, 1, 2] = scale_y, y0 + y1 - 1
    grid = F.affine_grid(theta, [len(images), 3, *size], align_corners=False)
    sampled = F.grid_sample(
        images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return sampled.round_().clamp_(0, 255).mul_(1.0 / 255)  # as v2.ToDtype scales


def normalize(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """(x - mean) / std per channel of a [0, 1] float batch, in place."""
    mean_t = torch.as_tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return images.sub_(mean_t).div_(std_t)


def evaluation_pixels(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) cached pixels as the evaluation transform's float (B, 3, H, W) tensors.

    The very arithmetic of ``v2.ToDtype(scale=True)`` and ``v2.Normalize`` (a float conversion,
    a multiplication by 1/255, a subtraction, a division), so that cached VALIDATE batches equal
    decoded ones bit for bit, on the host or on the device. ``mean`` and ``std``: (3,) tensors on
    the batch's device, made once (a tensor built from a list per batch is a copy to the GPU).
    """
    pixels = images.permute(0, 3, 1, 2).to(torch.float32).mul_(1.0 / 255).contiguous()
    return pixels.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def resolve_precision(precision: str | int, accelerator: str) -> str | int:
    """``auto``: bf16 autocast on a CUDA GPU that supports it, full precision elsewhere."""
    if str(precision) != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu and torch.cuda.is_bf16_supported() else "32-true"


def resolve_channels_last(value: str | bool, accelerator: str) -> bool:
    """``auto``: channels_last on a CUDA GPU (faster convolutions there), not on the CPU."""
    if str(value) != "auto":
        return bool(value)
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
