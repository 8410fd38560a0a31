"""Pixel conventions (embedded in exported models) and the train/eval transforms on cached uint8 CHW tensors."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # eval: resize the shorter side to image_size / CROP_RATIO, then center-crop (224 of 256)


def resize_size(image_size: int) -> int:
    """Shorter side of the cached (eval-resized) image for a model input of `image_size` pixels."""
    return math.ceil(image_size / CROP_RATIO)


def build_train_transform(image_size: int, *, crop_scale_min: float, color_jitter: float) -> v2.Compose:
    """Random crop + flip + mild colour jitter on a uint8 image, then normalised float32."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            # Saturation and hue are scaled down so white fur stays white-ish: coat colour is no breed cue here.
            v2.ColorJitter(
                brightness=color_jitter,
                contrast=color_jitter,
                saturation=color_jitter / 2,
                hue=color_jitter / 10,
            ),
            *_to_normalised_float(),
        ]
    )


def build_eval_transform(image_size: int) -> v2.Compose:
    """Center crop of an image already resized to `resize_size(image_size)`, then normalised float32."""
    return v2.Compose([v2.CenterCrop(image_size), *_to_normalised_float()])


def _to_normalised_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
