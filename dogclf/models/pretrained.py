"""Start a model from saved weights: a timm gMLP state dict, a dogclf state dict, or a Lightning checkpoint."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dogclf.config import ConfigError
from dogclf.models.gmlp import timm_to_dogclf


@dataclass(frozen=True)
class LoadReport:
    path: str
    source: str  # "timm" | "dogclf" | "lightning"
    loaded: int  # tensors copied into the model
    skipped: tuple[str, ...]  # model keys left at their fresh initialisation
    notes: tuple[str, ...]  # why they were skipped, in words

    def __str__(self) -> str:
        return "; ".join([f"loaded {self.loaded} tensors from {self.source} checkpoint {self.path}", *self.notes])


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Copy the weights in `path` into `model`.

    A head of another class count is skipped (left freshly initialised) and reported, as is aMLP attention
    missing from a gMLP checkpoint (it starts at zero output, so the model starts as that gMLP). Any other
    missing key or shape mismatch is a ConfigError that names the key and the fix.
    """
    state, source = _read(Path(path))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    must_have = [k for k in missing if not k.startswith("head.") and ".attn." not in k]
    for keys, what in ((must_have, "lacks"), (unexpected, "has extra keys such as")):
        if keys:
            raise ConfigError(
                f"{path} does not fit this model: it {what} {keys[0]} ({len(keys)} in all); "
                "use the preset (and model.attn_dim) the checkpoint was trained with"
            )
    skipped, notes = list(missing), []
    if any(".attn." in k for k in missing):
        notes.append("aMLP attention not in the checkpoint: starts at zero output")
    head = [k for k in own if k.startswith("head.")]
    if any(k in missing for k in head):
        notes.append("head not in the checkpoint: freshly initialised")
    elif any(state[k].shape != own[k].shape for k in head):
        skipped += head
        notes.append(f"head skipped: checkpoint has {len(state['head.bias'])} classes, model {len(own['head.bias'])}")
    for key in own:
        if key not in skipped and state[key].shape != own[key].shape:
            raise ConfigError(_mismatch(model, key, tuple(state[key].shape), tuple(own[key].shape), path))
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return LoadReport(str(path), source, len(own) - len(skipped), tuple(skipped), tuple(notes))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not path.is_file():
        raise ConfigError(f"model.init_from={path} does not exist: give the path of a checkpoint or state dict")
    try:  # weights_only: a checkpoint is data, so it must never run pickled code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ConfigError(
            f"{path} cannot be loaded with torch.load(weights_only=True) ({str(err).splitlines()[0]}): "
            "re-save only its tensors, e.g. torch.save(checkpoint['state_dict'], path)"
        ) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    source = "dogclf"
    if isinstance(obj.get("state_dict"), dict):  # Lightning (or timm's train.py) checkpoint
        obj = obj["state_dict"]
        if any(k.startswith("model.") for k in obj):  # our LightningModule holds the network as `self.model`
            obj, source = {k.removeprefix("model."): v for k, v in obj.items() if k.startswith("model.")}, "lightning"
    state = {k.replace("_orig_mod.", ""): v for k, v in obj.items()}  # torch.compile's wrapper prefix
    if "stem.proj.weight" in state:
        return timm_to_dogclf(state), "timm"
    return state, source


def _mismatch(model: nn.Module, key: str, theirs: tuple, ours: tuple, path: str | Path) -> str:
    text = f"{path}: {key} has shape {theirs} in the checkpoint but {ours} in the model"
    if key.startswith("blocks.") and ".sgu.proj." in key:
        side = math.isqrt(theirs[0]) * model.patch_size
        return (
            f"{text}: the spatial gating projection fixes the token count ({theirs[0]} vs {ours[0]}), "
            f"so use the image size the checkpoint was trained at: data.image_size={side}"
        )
    return f"{text}: use the preset and data.image_size the checkpoint was trained with"
