"""Pixel conventions (embedded in exported models) and the train/eval transforms on cached uint8 CHW tensors."""

from __future__ import annotations

import math

import torch
from torchvision import transforms as v1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # eval: resize the shorter side to image_size / CROP_RATIO, then center-crop (224 of 256)


def resize_size(image_size: int) -> int:
    """Shorter side of the cached (eval-resized) image for a model input of `image_size` pixels."""
    return math.ceil(image_size / CROP_RATIO)


def build_train_transform(image_size: int, *, crop_scale_min: float, color_jitter: float) -> TrainAugment:
    """Random crop + flip + mild colour jitter on a uint8 image, then normalised float32."""
    return TrainAugment(image_size, crop_scale_min=crop_scale_min, color_jitter=color_jitter)


class TrainAugment:
    """torchvision's RandomResizedCrop, RandomHorizontalFlip and ColorJitter (brightness and contrast `jitter`,
    saturation `jitter / 2`, hue `jitter / 10`: coat colour is no breed cue, white fur should stay white-ish), then
    normalisation; uint8 CHW in, float32 (3, S, S) out.

    The same random parameters and formulas as the v2 transforms, computed on a float image with torchvision's
    kernels called directly and the hue shift in closed form: the training loader serves 1.7x the images per second
    of the v2 pipeline, whose per-transform overhead, uint8 round trips and HSV conversion dominated
    (docs/performance.md). Without the uint8 truncation after each jitter step, the mean is no longer biased down.
    """

    def __init__(self, image_size: int, *, crop_scale_min: float, color_jitter: float) -> None:
        self.size = [image_size, image_size]
        self.scale = (crop_scale_min, 1.0)
        self.jitter = torch.tensor([color_jitter, color_jitter, color_jitter / 2])  # brightness, contrast, saturation
        self.hue = color_jitter / 10
        self.mean, self.std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        top, left, height, width = v1.RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        x = F.resized_crop_image(image, top, left, height, width, self.size, antialias=True)
        x = x.float().div_(255)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.hue > 0:
            x = self._jitter(x)
        return x.sub_(self.mean).div_(self.std)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        """ColorJitter: the four adjustments in a random order, each factor uniform around 1 (hue around 0)."""
        brightness, contrast, saturation = (1 + torch.empty(3).uniform_(-1, 1) * self.jitter).tolist()
        hue = torch.empty(()).uniform_(-self.hue, self.hue).item()
        for i in torch.randperm(4).tolist():
            if i == 0:
                x = F.adjust_brightness_image(x, brightness)
            elif i == 1:
                x = F.adjust_contrast_image(x, contrast)
            elif i == 2:
                x = F.adjust_saturation_image(x, saturation)
            else:
                x = shift_hue(x, hue)
        return x


def shift_hue(x: torch.Tensor, hue: float) -> torch.Tensor:
    """Rotate the HSV hue of a float RGB image in [0, 1] by `hue` turns: torchvision's adjust_hue in a few ops.

    RGB -> (hue, value = max, chroma = max - min) as torchvision computes them, then back with the closed form
    channel_n = value - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6, n = 5, 3, 1 for R, G, B.
    """
    r, g, b = x.unbind(-3)
    value, _ = x.max(-3)
    chroma = value - x.min(-3).values
    rc, gc, bc = ((value.unsqueeze(-3) - x) / torch.where(chroma == 0, 1, chroma).unsqueeze(-3)).unbind(-3)
    h = torch.where(value == r, bc - gc, torch.where(value == g, 2 + rc - bc, 4 + gc - rc))
    h = torch.where(chroma == 0, 0, h) / 6 + hue  # grey pixels keep hue 0, as in torchvision
    k = torch.remainder(_HSV_OFFSETS + 6 * h.unsqueeze(-3), 6)
    return value.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp_(0, 1)


_HSV_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def build_eval_transform(image_size: int) -> v2.Compose:
    """Center crop of an image already resized to `resize_size(image_size)`, then normalised float32."""
    return v2.Compose([v2.CenterCrop(image_size), *_to_normalised_float()])


def _to_normalised_float() -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
