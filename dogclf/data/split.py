"""Deterministic, stratified train/val/test split keyed on file content, stable when files are added."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path

from dogclf.data.index import Sample

SPLITS = ("train", "val", "test")


def split_score(sha1: str) -> float:
    """u in [0, 1) from a file's SHA-1: decides its split."""
    return _unit_score("split", sha1)


def keep_score(sha1: str) -> float:
    """A second score in [0, 1), independent of u, that decides which files `max_per_class` keeps.

    Keeping the lowest *split* scores would keep only test images (all u < N / class size).
    """
    return _unit_score("keep", sha1)


def _unit_score(tag: str, sha1: str) -> float:
    # Re-hash instead of reading the SHA-1's leading digits: a curated folder may have been selected by hash
    # prefix (the white-dogs photos have almost no SHA-1 starting with 0-2, so u < 0.15 would be nearly empty).
    digest = hashlib.sha256(f"dogclf-{tag}:{sha1}".encode()).hexdigest()
    return int(digest[:13], 16) / 16**13  # 52 bits: exact in a float64


def limit_per_class(samples: Sequence[Sample], max_per_class: int | None) -> list[Sample]:
    """Keep the `max_per_class` samples of each class with the lowest keep score (all when None)."""
    if max_per_class is None:
        return list(samples)
    kept: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        members = [s for s in samples if s.label == label]
        kept += sorted(members, key=lambda s: keep_score(s.sha1))[:max_per_class]
    return sorted(kept, key=lambda s: (s.label, s.path))


def split_samples(samples: Sequence[Sample], *, val_fraction: float, test_fraction: float) -> dict[str, list[Sample]]:
    """Per class: u < test_fraction -> test, u < test_fraction + val_fraction -> val, else train.

    A file's split depends only on its own bytes, so adding files never moves existing ones, except for the
    guarantee: a class with >= 3 images gets at least one in each split, and any class one in train.
    """
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    for label in sorted({s.label for s in samples}):
        parts: dict[str, list[Sample]] = {name: [] for name in SPLITS}
        for s in samples:
            if s.label == label:
                parts[_by_score(split_score(s.sha1), val_fraction, test_fraction)].append(s)
        _fill_empty(parts, ("train", "val", "test") if sum(map(len, parts.values())) >= 3 else ("train",))
        for name in SPLITS:
            splits[name] += sorted(parts[name], key=lambda s: s.path)
    return splits


def _by_score(u: float, val_fraction: float, test_fraction: float) -> str:
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


# Score ranges run test < val < train; an empty split takes the donor's image nearest to its own range.
_ORDER = {"test": 0, "val": 1, "train": 2}


def _fill_empty(parts: dict[str, list[Sample]], required: Sequence[str]) -> None:
    """Give each empty required split one image from the largest split (train on ties), in place."""
    for name in required:
        if parts[name]:
            continue
        donor = max(SPLITS, key=lambda d: (len(parts[d]), d == "train"))
        pick = max if _ORDER[name] > _ORDER[donor] else min
        moved = pick(parts[donor], key=lambda s: split_score(s.sha1))
        parts[donor].remove(moved)
        parts[name].append(moved)


def write_split_csv(path: Path, splits: dict[str, list[Sample]], classes: Sequence[str], root: Path) -> None:
    """One row per image: path (relative to the data root), class, split, sha1; sorted by path."""
    rows = sorted(
        (s.path.relative_to(root).as_posix(), classes[s.label], name, s.sha1) for name in SPLITS for s in splits[name]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape: a file name that is not valid UTF-8 is written back as its original bytes
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "split", "sha1"])
        writer.writerows(rows)
