"""Losses for long-tailed classification, all built from the TRAINING class counts n_c.

Every loss maps logits (B, C) and int64 targets (B,) to the mean loss (a float32 scalar):

    ce                 cross-entropy, optional per-class weights and label smoothing
    focal              Lin et al. 2017, "Focal Loss for Dense Object Detection"
    logit_adjusted     Menon et al. 2021, "Long-tail learning via logit adjustment"
    balanced_softmax   Ren et al. 2020, "Balanced Meta-Softmax for Long-Tailed Visual Recognition"
    ldam               Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin Loss"

plus deferred re-weighting (DRW, Cao et al. 2019) for any of them, and post-hoc logit adjustment
(Menon et al. 2021) with its tau tuned on validation logits.

A class with count 0 gets weight 0 (it never appears as a training target) and, for priors and margins,
is treated as if it had been seen once (the rarest possible observed class), so nothing is ever inf/nan.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dogclf.config import LOSSES, WEIGHTINGS  # the valid names live with the config that selects them

TAUS = tuple(0.25 * i for i in range(13))  # 0.0, 0.25, ..., 3.0: the default post-hoc grid


def _counts(counts: Sequence[int]) -> torch.Tensor:
    """Training class counts as a float64 (C,) tensor, checked."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.ndim != 1 or n.numel() == 0 or (n < 0).any() or n.sum() == 0:
        raise ValueError(f"class_counts must be a non-empty list of counts >= 0, not all 0; got {list(counts)}")
    return n


def class_weights(counts: Sequence[int], scheme: str, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights (C,) float32 from training counts n_c.

    none: 1; inverse: 1/n_c; inverse_sqrt: 1/sqrt(n_c); effective_number: (1 - beta) / (1 - beta**n_c)
    (Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples"). All but `none` are
    scaled to sum to C, as in Cui et al.; a class with n_c = 0 gets weight 0 and the others share the sum.
    """
    n = _counts(counts)  # (C,)
    if scheme == "none":
        return torch.ones_like(n, dtype=torch.float32)
    seen = n > 0
    m = n.clamp(min=1)  # placeholder count for unseen classes, masked out below
    if scheme == "inverse":
        w = 1 / m
    elif scheme == "inverse_sqrt":
        w = m.rsqrt()
    elif scheme == "effective_number":
        _check_beta(beta)
        w = (1 - beta) / (1 - beta**m)
    else:
        raise ValueError(f"unknown class weighting {scheme!r}: expected one of {', '.join(WEIGHTINGS)}")
    w = torch.where(seen, w, torch.zeros_like(w))
    return (w * len(n) / w.sum()).float()


def log_prior(counts: Sequence[int]) -> torch.Tensor:
    """log(n_c / sum n) (C,) float32, with unseen classes counted once so the log stays finite."""
    n = _counts(counts).clamp(min=1)
    return (n / n.sum()).log().float()


def ldam_margins(counts: Sequence[int], max_margin: float = 0.5) -> torch.Tensor:
    """LDAM margins m_c proportional to n_c**-1/4, the largest equal to `max_margin` (Cao et al. 2019); (C,)."""
    n = _counts(counts).clamp(min=1)  # an unseen class gets the largest margin
    m = n**-0.25
    return (m * max_margin / m.max()).float()


class ImbalanceLoss(nn.Module):
    """One of LOSSES with optional per-class weights, label smoothing and deferred re-weighting.

    Build it with `build_loss`. With `drw_epoch` set, the weights are ones before that epoch and the
    effective-number weights (with `beta`) from it on (DRW, Cao et al. 2019); `weighting` is then ignored.
    The training loop calls `set_epoch(epoch)` at each epoch start (a no-op without DRW); the module
    starts at epoch 0. Per-class tensors are non-persistent buffers: they follow `.to(device)` and stay
    out of checkpoints, being rebuilt from the class counts.
    """

    def __init__(
        self,
        name: str,
        *,
        class_counts: Sequence[int],
        label_smoothing: float = 0.0,
        weighting: str = "none",
        beta: float = 0.999,
        focal_gamma: float = 2.0,
        tau: float = 1.0,
        ldam_max_margin: float = 0.5,
        ldam_scale: float = 30.0,
        drw_epoch: int | None = None,
    ):
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}: expected one of {', '.join(LOSSES)}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if name == "focal" and label_smoothing > 0:
            raise ValueError("focal loss does not combine with label smoothing: set optim.label_smoothing=0")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown class weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
        _check_beta(beta)
        for key, value in (("focal_gamma", focal_gamma), ("tau", tau), ("ldam_max_margin", ldam_max_margin)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if ldam_scale <= 0:
            raise ValueError(f"ldam_scale must be > 0, got {ldam_scale}")
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0):
            raise ValueError(f"drw_epoch must be None or an int >= 0, got {drw_epoch!r}")

        self.name, self.label_smoothing, self.gamma, self.scale = name, label_smoothing, focal_gamma, ldam_scale
        self.drw_epoch = drw_epoch
        self.num_classes = len(class_counts)
        scheme = "effective_number" if drw_epoch is not None else weighting
        self.register_buffer("weight", class_weights(class_counts, scheme, beta), persistent=False)  # (C,)
        self.weighted = scheme != "none"
        # added to the logits: tau * log prior (Menon et al.), log n_c = log prior + log N (Ren et al.), else 0
        offset = {"logit_adjusted": tau * log_prior(class_counts), "balanced_softmax": _log_counts(class_counts)}
        self.register_buffer("offset", offset.get(name, torch.zeros(self.num_classes)), persistent=False)  # (C,)
        margin = ldam_margins(class_counts, ldam_max_margin) if name == "ldam" else torch.zeros(self.num_classes)
        self.register_buffer("margin", margin, persistent=False)  # (C,)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """DRW: switch the class weights on from `drw_epoch`; nothing to do without DRW."""
        if self.drw_epoch is not None:
            self.weighted = epoch >= self.drw_epoch

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits (B, {self.num_classes}), got {tuple(logits.shape)}")
        logits = logits.float()  # (B, C) float32 whatever the autocast / model dtype
        weight = self.weight.float() if self.weighted else None  # (C,) or None; buffers may have been cast
        if self.name == "focal":
            return _focal(logits, targets, self.gamma, weight)
        if self.name == "ldam":
            # subtract the target class's margin from the target logit only, then scale all logits
            logits = self.scale * (logits - self.margin.float() * F.one_hot(targets, self.num_classes))
        else:
            logits = logits + self.offset.float()  # (B, C) + (C,); zeros for plain ce
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        drw = f", drw_epoch={self.drw_epoch}" if self.drw_epoch is not None else ""
        return f"{self.name}, weighted={self.weighted}, label_smoothing={self.label_smoothing}{drw}"


def build_loss(name: str, *, class_counts: Sequence[int], **kwargs) -> ImbalanceLoss:
    """The training loss `name` (one of LOSSES); keyword arguments as ImbalanceLoss."""
    return ImbalanceLoss(name, class_counts=class_counts, **kwargs)


def _focal(logits: torch.Tensor, targets: torch.Tensor, gamma: float, weight: torch.Tensor | None) -> torch.Tensor:
    """-(1 - p_t)**gamma * log p_t (Lin et al. 2017), weighted by alpha_t = weight[t] when given."""
    logp_t = logits.log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)  # (B,)
    # 1 - p_t via expm1 stays accurate as p_t -> 1; the clamp keeps the gradient finite at 0 when gamma < 1
    one_minus_p_t = (-logp_t.expm1()).clamp(min=torch.finfo(logp_t.dtype).tiny)  # (B,)
    loss = -(one_minus_p_t**gamma) * logp_t  # (B,)
    if weight is None:
        return loss.mean()
    w_t = weight[targets]  # (B,)
    return (w_t * loss).sum() / w_t.sum()  # normalised like weighted cross-entropy


def adjust_logits(logits: torch.Tensor, class_counts: Sequence[int], tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021): logits - tau * log prior, (B, C) float32."""
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    return logits.float() - tau * log_prior(class_counts).to(logits.device)


@torch.no_grad()
def tune_tau(
    logits: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int], taus: Sequence[float] = TAUS
) -> tuple[float, float]:
    """(best tau, its balanced accuracy) for post-hoc adjustment, on validation logits (B, C) / targets (B,).

    Balanced accuracy is the mean recall over the classes present in `targets` (as in dogclf.metrics);
    ties go to the smallest tau, i.e. the least adjustment.
    """
    if targets.numel() == 0 or len(taus) == 0:
        raise ValueError("tune_tau needs at least one validation sample and one tau")
    best_tau, best_acc = math.nan, -math.inf
    for tau in sorted(taus):
        preds = adjust_logits(logits, class_counts, tau).argmax(dim=-1)  # (B,)
        acc = _balanced_accuracy(preds, targets, logits.shape[1])
        if acc > best_acc + 1e-12:  # strictly better, so an equal score keeps the smaller tau
            best_tau, best_acc = float(tau), acc
    return best_tau, best_acc


def _balanced_accuracy(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """Mean recall over the classes present in targets; preds, targets (B,) int."""
    support = torch.bincount(targets, minlength=num_classes)  # (K,)
    hits = torch.bincount(targets[preds == targets], minlength=num_classes)  # (K,)
    present = support > 0
    return (hits[present] / support[present]).mean().item()


def _log_counts(counts: Sequence[int]) -> torch.Tensor:
    """log n_c (C,) float32, unseen classes counted once (log 1 = 0)."""
    return _counts(counts).clamp(min=1).log().float()


def _check_beta(beta: float) -> None:
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
