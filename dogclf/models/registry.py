"""Preset registry in the style of timm: `create_model("gmlp-nano", num_classes=5, image_size=64)`.

A preset function returns `functools.partial(ModelClass, **preset_args)` instead of a built model, so
`create_model` can check overrides against the class signature and the image size against the patch size
before any weights are allocated, and raise a `ConfigError` that names the setting to fix.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from dogclf.config import ConfigError

Preset = Callable[[], functools.partial]
_PRESETS: dict[str, Preset] = {}
_COMMON = ("num_classes", "image_size", "in_chans")  # set by create_model itself, never by a preset


def register_model(name: str) -> Callable[[Preset], Preset]:
    """Decorator: register a preset function under `name`."""

    def decorator(fn: Preset) -> Preset:
        if name in _PRESETS:
            raise ValueError(f"model preset {name!r} is registered twice")
        _PRESETS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    return sorted(_PRESETS)


def create_model(name: str, *, num_classes: int, image_size: int, in_chans: int = 3, **overrides) -> nn.Module:
    """Build preset `name`; overrides set to None keep the preset's value (the job config's `null`)."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model.preset {name!r}: choose one of {', '.join(list_models())}")
    build = _PRESETS[name]()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    options = [p for p in inspect.signature(build.func).parameters if p not in _COMMON]
    unknown = [k for k in overrides if k not in options]
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]}={overrides[unknown[0]]!r} does not apply to preset {name}: set it to null "
            f"({name} accepts {', '.join(options)})"
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}: check the class folders of data.root")
    if image_size < 1:
        raise ConfigError(f"data.image_size={image_size} must be a positive number of pixels")
    patch = {**build.keywords, **overrides}.get("patch_size", 1)
    if image_size % patch:
        lower = image_size // patch * patch
        hint = f"{lower} or {lower + patch}" if lower else f"{patch} or {2 * patch}"
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of {name}'s patch size {patch}: use e.g. {hint}"
        )
    return build(num_classes=num_classes, image_size=image_size, in_chans=in_chans, **overrides)
