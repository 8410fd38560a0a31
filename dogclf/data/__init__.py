"""Data pipeline: class folders -> content-hash split -> decoded-once uint8 cache -> transforms -> loaders.

Names are imported on first use (PEP 562), so `dogclf data fetch` and error handling do not pay for torch.
"""

import importlib

_EXPORTS = {
    "CROP_RATIO": "transforms",
    "IMAGENET_MEAN": "transforms",
    "IMAGENET_STD": "transforms",
    "SPLITS": "split",
    "DataError": "index",
    "Sample": "index",
    "WhiteDogsDataModule": "datamodule",
    "build_eval_transform": "transforms",
    "build_train_transform": "transforms",
    "decode_image": "cache",
    "resize_size": "transforms",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
