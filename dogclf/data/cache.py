"""Decode every image once into a uint8 CHW tensor (shorter side = the eval resize); optionally keep them on disk."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from dogclf.checkpointing import atomic_torch_save

# Bump when decode_image changes what it produces, so that old cache files are not reused.
CACHE_VERSION = 2

Images = dict[str, torch.Tensor]  # sha1 -> uint8 CHW image
Failures = dict[str, str]  # sha1 -> why the file could not be decoded


def decode_image(path: Path, short_side: int) -> torch.Tensor:
    """Decode `path` upright in RGB and resize it (antialiased) so that its shorter side is `short_side`."""
    with Image.open(path) as im:
        # The output shape comes from the full-resolution size: draft() rounds the reduced size up.
        width, height = _upright_size(im)
        # JPEG only (a no-op otherwise): decode at 1/2, 1/4 or 1/8 scale, 2-3x faster. Drafting to twice the target
        # leaves the filtering to the antialiased resize: drafting to the target itself moved some photos by up to
        # 14/255 per pixel on average from a full decode (under 5/255 at twice).
        im.draft("RGB", (2 * short_side, 2 * short_side))
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I"):  # 16-bit greyscale: scale to 8 bits (convert("RGB") would clip at 255)
            im = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
        im = im.convert("RGB")
    scale = short_side / min(width, height)
    size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied: orientations 5-8 turn the image by 90 degrees."""
    rotated = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (im.height, im.width) if rotated else im.size


def load_images(files: dict[str, Path], short_side: int, cache_dir: str | Path | None) -> tuple[Images, Failures]:
    """Decoded images for `files` (sha1 -> path), and the reasons for those that failed to decode.

    With `cache_dir`, the result is read from / written to one file keyed by `short_side` and the set of hashes.
    """
    if cache_dir is None:
        return _decode_all(files, short_side)
    path = Path(cache_dir) / _cache_name(files, short_side)
    cached = _read(path, files)
    if cached is not None:
        return cached
    images, failures = _decode_all(files, short_side)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"images": images, "failures": failures}, path)  # concurrent ranks race safely
    return images, failures


def _decode_all(files: dict[str, Path], short_side: int) -> tuple[Images, Failures]:
    def decode(path: Path) -> torch.Tensor | str:
        try:
            return decode_image(path, short_side)
        except Exception as err:  # Pillow's format plugins raise many exception types on bad input
            return f"{type(err).__name__}: {err}"

    # Pillow releases the GIL while decoding and resizing, so threads use every core without pickling.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        results = dict(zip(files, pool.map(decode, files.values())))
    images = {k: v for k, v in results.items() if isinstance(v, torch.Tensor)}
    failures = {k: v for k, v in results.items() if isinstance(v, str)}
    return images, failures


def _cache_name(sha1s: Iterable[str], short_side: int) -> str:
    text = "\n".join([f"v{CACHE_VERSION}", str(short_side), *sorted(sha1s)])
    key = hashlib.sha1(text.encode()).hexdigest()
    return f"images-{short_side}px-{key[:16]}.pt"


def _read(path: Path, sha1s: Iterable[str]) -> tuple[Images, Failures] | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        warnings.warn(f"image cache {path} is unreadable ({err}); decoding the images again")
        return None
    if set(data["images"]) | set(data["failures"]) != set(sha1s):  # only on a key-prefix collision
        return None
    return data["images"], data["failures"]
