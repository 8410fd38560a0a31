"""Baseline: a plain MLP on flattened pixels, to show what gMLP's token mixing buys."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dogclf.config import ConfigError
from dogclf.models.registry import register_model


class BasicMLP(nn.Module):
    """flatten -> [Linear -> GELU -> Dropout] per hidden size -> Linear head."""

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        in_chans: int = 3,
        hidden_sizes: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        if not hidden_sizes or min(hidden_sizes) < 1:
            raise ConfigError(f"model.hidden_sizes={list(hidden_sizes)} must list positive widths, e.g. [512, 256]")
        if not 0 <= dropout < 1:
            raise ConfigError(f"model.dropout={dropout} must be in [0, 1)")
        widths = [in_chans * image_size**2, *hidden_sizes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = x.flatten(1)  # (B, C*H*W)
        for layer in self.layers:
            x = self.drop(F.gelu(layer(x)))
        return self.head(x)


@register_model("basic-mlp")
def basic_mlp() -> functools.partial:
    return functools.partial(BasicMLP, hidden_sizes=(512, 256), dropout=0.2)
