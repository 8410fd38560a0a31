"""gMLP for images, as in "Pay Attention to MLPs" (Liu et al. 2021, arXiv 2105.08050), plus its aMLP variant.

patch embedding -> depth x [x + drop_path(proj_out(SGU(GELU(proj_in(LayerNorm(x))))))] -> LayerNorm -> mean -> head.
There is no positional encoding: the Spatial Gating Unit's token-mixing projection carries position, and it
also fixes the token count, so a model (and its checkpoints) serves one image size.

The paper's ImageNet models are `gmlp-ti/s/b`; `gmlp-pico/nano/micro` are small enough to train on a laptop CPU.

State dicts of timm's `gmlp_ti16_224` / `gmlp_s16_224` / `gmlp_b16_224` convert with `timm_to_dogclf`
(N is the block index; the parameter name after the module path, `weight` or `bias`, is unchanged):

    timm                                dogclf
    stem.proj                           patch_embed
    blocks.N.norm                       blocks.N.norm
    blocks.N.mlp_channels.fc1           blocks.N.proj_in
    blocks.N.mlp_channels.gate.norm     blocks.N.sgu.norm
    blocks.N.mlp_channels.gate.proj     blocks.N.sgu.proj
    blocks.N.mlp_channels.fc2           blocks.N.proj_out
    norm                                norm
    head                                head
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dogclf.config import ConfigError
from dogclf.models.registry import register_model

LN_EPS = 1e-6  # as timm and the paper's TF code, not PyTorch's 1e-5: keeps timm weights exact

TIMM_TO_DOGCLF = {  # module paths of the table above
    "stem.proj": "patch_embed",
    "blocks.N.norm": "blocks.N.norm",
    "blocks.N.mlp_channels.fc1": "blocks.N.proj_in",
    "blocks.N.mlp_channels.gate.norm": "blocks.N.sgu.norm",
    "blocks.N.mlp_channels.gate.proj": "blocks.N.sgu.proj",
    "blocks.N.mlp_channels.fc2": "blocks.N.proj_out",
    "norm": "norm",
    "head": "head",
}


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(1, x.shape[1], 1).bernoulli_(1 - self.p)  # (1, B, 1): one draw per sample
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class SpatialGatingUnit(nn.Module):
    """u * (proj_tokens(LayerNorm(v)) + attention), with (u, v) the two channel halves of the input."""

    def __init__(self, *, dim_ffn: int, num_tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim_ffn // 2, eps=LN_EPS)
        self.proj = nn.Linear(num_tokens, num_tokens)  # mixes tokens, not channels
        # Near-zero weights and unit bias make the gate ~1 at init, so each block starts as a plain FFN (paper 2.1).
        nn.init.normal_(self.proj.weight, std=1e-6)
        nn.init.ones_(self.proj.bias)

    def forward(self, u: torch.Tensor, v: torch.Tensor, attn: torch.Tensor | None = None) -> torch.Tensor:
        v = self.norm(v)  # u, v: (N, B, F/2)
        # Token-major layout: mixing tokens is one GEMM, W (N, N) @ v (N, B*F/2), with no transposed copies.
        v = torch.addmm(self.proj.bias[:, None], self.proj.weight, v.flatten(1)).view_as(v)
        if attn is not None:
            v = v + attn
        return u * v  # (N, B, F/2)


class TinyAttention(nn.Module):
    """aMLP's single-head attention of width `attn_dim`; its output is added to the gate before the product."""

    def __init__(self, *, dim: int, dim_out: int, attn_dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * attn_dim)
        self.proj = nn.Linear(attn_dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "n b a -> b n a").chunk(3, dim=-1)  # (B, N, A) each
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b n a -> n b a"))  # (N, B, dim_out)


class GMLPBlock(nn.Module):
    def __init__(self, *, dim: int, dim_ffn: int, num_tokens: int, drop_path: float, attn_dim: int | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj_in = nn.Linear(dim, dim_ffn)
        self.sgu = SpatialGatingUnit(dim_ffn=dim_ffn, num_tokens=num_tokens)
        self.attn = TinyAttention(dim=dim, dim_out=dim_ffn // 2, attn_dim=attn_dim) if attn_dim else None
        self.proj_out = nn.Linear(dim_ffn // 2, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, B, D) -> (N, B, D)
        h = self.norm(x)
        # proj_in as two GEMMs on its weight halves (views): u and v come out contiguous, so the gate's LayerNorm
        # needs no copy of v and the backward no concatenation of their gradients. u is the first half, as in timm.
        (w_u, w_v), (b_u, b_v) = self.proj_in.weight.chunk(2), self.proj_in.bias.chunk(2)
        u, v = F.gelu(F.linear(h, w_u, b_u)), F.gelu(F.linear(h, w_v, b_v))  # (N, B, F/2) each
        attn = self.attn(h) if self.attn is not None else None  # aMLP attends to the normalised block input
        return x + self.drop_path(self.proj_out(self.sgu(u, v, attn)))


class GMLP(nn.Module):
    """gMLP image classifier; `attn_dim` turns it into aMLP."""

    def __init__(
        self,
        *,
        num_classes: int,
        image_size: int,
        in_chans: int = 3,
        patch_size: int,
        dim: int,
        depth: int,
        ffn_ratio: int = 6,
        drop_path_rate: float = 0.0,
        attn_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= drop_path_rate < 1:
            raise ConfigError(f"model.drop_path_rate={drop_path_rate} must be in [0, 1)")
        if attn_dim is not None and attn_dim < 1:
            raise ConfigError(f"model.attn_dim={attn_dim} must be a positive width, or null for plain gMLP")
        self.image_size, self.patch_size = image_size, patch_size
        num_tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        # Stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last (the linear decay
        # rule of Huang et al. 2016); timm's gMLP uses the same rate in every block.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(
            *[
                GMLPBlock(dim=dim, dim_ffn=dim * ffn_ratio, num_tokens=num_tokens, drop_path=r, attn_dim=attn_dim)
                for r in rates
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("sgu.proj"):  # the SGU inits its own
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the conv is a linear map of each patch (as MAE)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.zeros_(self.head.weight)  # as timm's Mixer family: initial logits 0, loss log(num_classes)
        for block in self.blocks:
            if block.attn is not None:
                nn.init.zeros_(block.attn.proj.weight)  # an aMLP starts as the gMLP, so gMLP weights load into it

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this gMLP takes {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = rearrange(self.patch_embed(x), "b d h w -> (h w) b d")  # (N, B, D): token-major, see SpatialGatingUnit
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=0))


def timm_to_dogclf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm gMLP state dict to dogclf's keys (see the module docstring); tensors are shared."""
    out = {}
    for key, value in state_dict.items():
        module, _, param = key.rpartition(".")
        index = re.match(r"blocks\.(\d+)\.", module)
        generic = re.sub(r"^blocks\.\d+\.", "blocks.N.", module)
        if generic not in TIMM_TO_DOGCLF:
            raise ConfigError(f"{key} is not a key of a timm gMLP (gmlp_ti16_224 / gmlp_s16_224 / gmlp_b16_224)")
        target = TIMM_TO_DOGCLF[generic]
        out[f"{target.replace('N', index[1]) if index else target}.{param}"] = value
    return out


# The paper's ImageNet models (224 px): drop_path = 1 - survival probability 1.00 / 0.95 / 0.80.
@register_model("gmlp-ti")
def gmlp_ti() -> functools.partial:
    return functools.partial(GMLP, patch_size=16, dim=128, depth=30, drop_path_rate=0.0)


@register_model("gmlp-s")
def gmlp_s() -> functools.partial:
    return functools.partial(GMLP, patch_size=16, dim=256, depth=30, drop_path_rate=0.05)


@register_model("gmlp-b")
def gmlp_b() -> functools.partial:
    return functools.partial(GMLP, patch_size=16, dim=512, depth=30, drop_path_rate=0.2)


# Small models for a 2-core CPU at 64-96 px (patch 8: 64-144 tokens).
@register_model("gmlp-pico")
def gmlp_pico() -> functools.partial:
    return functools.partial(GMLP, patch_size=8, dim=32, depth=2, drop_path_rate=0.0)


@register_model("gmlp-nano")
def gmlp_nano() -> functools.partial:
    return functools.partial(GMLP, patch_size=8, dim=128, depth=8, drop_path_rate=0.05)


@register_model("gmlp-micro")
def gmlp_micro() -> functools.partial:
    return functools.partial(GMLP, patch_size=8, dim=128, depth=16, drop_path_rate=0.1)
