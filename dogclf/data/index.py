"""Find the images: one sub-folder per class under the data root, each file keyed by the SHA-1 of its bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})


class DataError(ValueError):
    """A data folder problem the user must fix; the message names the path and the fix."""


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    label: int  # index into the sorted class names
    sha1: str  # of the file's bytes: the split key and the cache key


def scan(root: Path) -> tuple[list[str], list[Sample], list[tuple[Path, str]]]:
    """Return the sorted class names, the samples, and the (path, reason) of image files that could not be read."""
    classes = class_folders(root)
    samples: list[Sample] = []
    unreadable: list[tuple[Path, str]] = []
    for label, name in enumerate(classes):
        for path in image_files(root / name):
            try:
                samples.append(Sample(path, label, hashlib.sha1(path.read_bytes()).hexdigest()))
            except OSError as err:
                unreadable.append((path, f"{type(err).__name__}: {err.strerror or err}"))
    require_images(root, classes, samples)
    return classes, samples, unreadable


def class_folders(root: Path) -> list[str]:
    if not root.exists():
        raise DataError(f"data root {root} does not exist: pass --data DIR, a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: pass --data DIR, a folder with one sub-folder per class")
    # Files at the top (MANIFEST.csv, README.md) and hidden folders (.cache, .git) are not classes.
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"only the class folder {classes[0]}" if classes else "no class folders"
        raise DataError(f"data root {root} has {found}: add one sub-folder of images per class, at least two")
    return classes


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, by extension (any case), hidden files skipped, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def require_images(root: Path, classes: Sequence[str], samples: Sequence[Sample]) -> None:
    """Raise DataError for the first class that has no samples left."""
    present = {s.label for s in samples}
    for label, name in enumerate(classes):
        if label not in present:
            raise DataError(f"class folder {root / name} has no usable images: add images or remove the folder")
