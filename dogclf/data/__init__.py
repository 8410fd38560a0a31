"""Data pipeline: class folders -> content-hash split -> decoded-once uint8 cache -> transforms -> loaders."""

from dogclf.data.cache import decode_image
from dogclf.data.datamodule import WhiteDogsDataModule
from dogclf.data.index import DataError, Sample
from dogclf.data.split import SPLITS
from dogclf.data.transforms import (
    CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
    resize_size,
)

__all__ = [
    "CROP_RATIO",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SPLITS",
    "DataError",
    "Sample",
    "WhiteDogsDataModule",
    "build_eval_transform",
    "build_train_transform",
    "decode_image",
    "resize_size",
]
