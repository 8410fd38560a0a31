"""The LightningDataModule: class folders -> content-hash split -> decoded-once uint8 images -> loaders."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from dogclf.config import DataConfig
from dogclf.data.cache import load_images
from dogclf.data.index import Sample, require_images, scan
from dogclf.data.sampling import SAMPLER_POWERS, EpochSampler, ShardSampler, class_sampling_weights
from dogclf.data.split import limit_per_class, split_samples, write_split_csv
from dogclf.data.transforms import build_eval_transform, build_train_transform, resize_size


class CachedImages(Dataset):
    """(transformed image, label) pairs over images decoded ahead of time."""

    def __init__(self, images: Sequence[torch.Tensor], labels: Sequence[int], transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A small image gains nothing from intra-op threads: with num_workers=0 on 2 busy cores their barriers made
        # a 64 px epoch 4-17x slower (DataLoader worker processes run single-threaded already).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.transform(self.images[index]), self.labels[index]
        finally:
            torch.set_num_threads(threads)


class WhiteDogsDataModule(LightningDataModule):
    """Images in one sub-folder per class under `cfg.root` (class = folder name, sorted).

    After `setup`: `root` (absolute), `classes`, `train_class_counts` (per class, train split only), `splits`
    ("train", "val", "test" -> list of Sample) and `datasets` (same keys; items are (normalised image, label)).
    """

    def __init__(self, cfg: DataConfig, *, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed  # draws the order of every training epoch
        self.root: Path | None = None
        self.classes: list[str] = []
        self.train_class_counts: list[int] = []
        self.splits: dict[str, list[Sample]] = {}
        self.datasets: dict[str, CachedImages] = {}

    def setup(self, stage: str | None = None) -> None:
        """Scan, split and decode, all only once although Lightning calls this for every stage."""
        if self.splits:
            return
        root = Path(self.cfg.root).resolve()  # relative to the working directory
        classes, samples, unreadable = scan(root)
        samples = limit_per_class(samples, self.cfg.max_per_class)
        short_side = resize_size(self.cfg.image_size)
        images, failures = load_images({s.sha1: s.path for s in samples}, short_side, self.cfg.cache_dir)
        _warn_skipped(unreadable + [(s.path, failures[s.sha1]) for s in samples if s.sha1 in failures])
        samples = [s for s in samples if s.sha1 in images]
        require_images(root, classes, samples)
        splits = split_samples(samples, val_fraction=self.cfg.val_fraction, test_fraction=self.cfg.test_fraction)
        self.datasets = self._datasets(splits, images)
        self.root, self.classes, self.splits = root, classes, splits
        self.train_class_counts = [sum(s.label == label for s in splits["train"]) for label in range(len(classes))]

    def write_split_csv(self, path: str | Path) -> None:
        """Record the split (path relative to the data root, class, split, sha1) for the run directory."""
        write_split_csv(Path(path), self.splits, self.classes, self.root)

    def train_dataloader(self) -> DataLoader:
        # Class-aware sampling (Kang et al. 2020, "decoupling"): one epoch = as many draws as training images, an
        # image drawn with probability proportional to 1/sqrt(n_c) (sqrt) or 1/n_c (balanced) of its class n_c.
        # drop_last=False: the last partial batch may hold the only images of a rare class.
        weights = class_sampling_weights(
            self.datasets["train"].labels, self.train_class_counts, SAMPLER_POWERS[self.cfg.sampler]
        )
        sampler = EpochSampler(weights, seed=self.seed, **self._rank_and_world())
        return self._loader("train", sampler=sampler, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", sampler=ShardSampler(len(self.datasets["val"]), **self._rank_and_world()))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", sampler=ShardSampler(len(self.datasets["test"]), **self._rank_and_world()))

    def _rank_and_world(self) -> dict[str, int]:
        trainer = self.trainer
        return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer else {}

    def _datasets(self, splits: dict[str, list[Sample]], images: dict[str, torch.Tensor]) -> dict[str, CachedImages]:
        cfg = self.cfg
        train = build_train_transform(cfg.image_size, crop_scale_min=cfg.crop_scale_min, color_jitter=cfg.color_jitter)
        evaluate = build_eval_transform(cfg.image_size)
        return {
            name: CachedImages(
                [images[s.sha1] for s in part], [s.label for s in part], train if name == "train" else evaluate
            )
            for name, part in splits.items()
        }

    def _loader(self, split: str, **kwargs) -> DataLoader:
        workers = self.cfg.num_workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.cfg.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            **kwargs,
        )


def _warn_skipped(skipped: list[tuple[Path, str]]) -> None:
    """One warning for all files that could not be used, so a bad folder does not flood the log."""
    if skipped:
        lines = "".join(f"\n  {path}: {reason}" for path, reason in sorted(skipped))
        warnings.warn(f"skipped {len(skipped)} unreadable image file(s):{lines}", stacklevel=3)
