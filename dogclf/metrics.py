"""Classification metrics computed from one confusion matrix, and its picture.

Everything derives from the (true x predicted) count matrix, so DDP only has to sum one tensor and
every number in a report is consistent with every other. Classes with no true samples in a split
are left out of balanced accuracy (their recall is undefined), and reported as NaN per class.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch


def classification_metrics(confusion: torch.Tensor, classes: list[str]) -> dict[str, object]:
    """accuracy, balanced_accuracy (mean recall over classes present), macro_f1, per-class recall/precision/support.

    `confusion[i, j]` counts samples of true class i predicted as j.
    """
    cm = confusion.double().cpu()
    support = cm.sum(dim=1)  # true samples per class
    predicted = cm.sum(dim=0)  # predictions per class
    hits = cm.diag()
    total = support.sum().item()
    present = support > 0
    recall = torch.where(present, hits / support.clamp(min=1), torch.full_like(hits, math.nan))
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), torch.zeros_like(hits))
    # F1 of a class present in the split; a class never predicted has precision 0 and so F1 0.
    f1 = torch.where(
        present & (hits > 0), 2 * hits / (support + predicted).clamp(min=1), torch.zeros_like(hits)
    )
    return {
        "accuracy": hits.sum().item() / total if total else math.nan,
        "balanced_accuracy": recall[present].mean().item() if present.any() else math.nan,
        "macro_f1": f1[present].mean().item() if present.any() else math.nan,
        "per_class_recall": dict(zip(classes, recall.tolist())),
        "per_class_precision": dict(zip(classes, precision.tolist())),
        "per_class_support": dict(zip(classes, [int(s) for s in support.tolist()])),
    }


SHOT_GROUPS = (("many", 101, math.inf), ("medium", 20, 100), ("few", 0, 19))  # training images per class


def bootstrap_intervals(
    confusion: torch.Tensor, *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Stratified percentile bootstrap intervals of accuracy, balanced accuracy and macro-F1.

    Each resample redraws, class by class, as many test images as the class has (with replacement, from that
    class's row of the confusion matrix), so every class stays present and balanced accuracy keeps its meaning.
    A class with one or two test images contributes almost no spread here: its own uncertainty is the Wilson
    interval of its recall (`wilson_interval`), reported next to it.
    """
    cm = confusion.double().cpu()
    classes, n = cm.shape[0], int(cm.sum())
    if n == 0:
        return {key: (math.nan, math.nan) for key in ("accuracy", "balanced_accuracy", "macro_f1")}
    generator = torch.Generator().manual_seed(seed)
    cms = torch.zeros(resamples, classes, classes, dtype=torch.double)  # (R, C, C)
    for c in range(classes):
        n_c = int(cm[c].sum())
        if n_c:
            draws = torch.multinomial(cm[c] / n_c, n_c * resamples, replacement=True, generator=generator)
            cms[:, c].scatter_add_(1, draws.view(resamples, n_c), torch.ones(resamples, n_c, dtype=torch.double))
    support, predicted, hits = cms.sum(2), cms.sum(1), cms.diagonal(dim1=1, dim2=2)  # (R, C) each
    present = cm.sum(1) > 0  # (C,)
    recall = hits[:, present] / support[:, present]
    f1 = 2 * hits[:, present] / (support + predicted)[:, present]
    values = {"accuracy": hits.sum(1) / n, "balanced_accuracy": recall.mean(1), "macro_f1": f1.mean(1)}
    tail = (1 - level) / 2
    quantiles = torch.tensor([tail, 1 - tail], dtype=torch.double)
    return {key: tuple(torch.quantile(v, quantiles).tolist()) for key, v in values.items()}


def wilson_interval(hits: int, total: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (here a class's recall): sensible even for 0/1 or 1/1."""
    if total == 0:
        return (math.nan, math.nan)
    z = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(0.5 + level / 2)))
    p = hits / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def shot_group_recall(per_class_recall: dict[str, float], train_counts: dict[str, int]) -> dict[str, float]:
    """Mean recall over the many- (>100 training images), medium- (20-100) and few-shot (<20) classes."""
    groups = {}
    for name, low, high in SHOT_GROUPS:
        recalls = [r for c, r in per_class_recall.items() if low <= train_counts[c] <= high and not math.isnan(r)]
        groups[name] = sum(recalls) / len(recalls) if recalls else math.nan
    return groups


def confusion_matrix_figure(confusion: torch.Tensor, classes: list[str], title: str = ""):
    """A matplotlib figure: rows = true class (row-normalised colour), cells annotated with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion.cpu().numpy().astype(np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = 1.2 + 0.9 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=35, ha="right")
    ax.set_yticks(ticks, [f"{c} ({n})" for c, n in zip(classes, rows[:, 0])])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (support)")
    for i in ticks:
        for j in ticks:
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """Render a figure to an RGB uint8 HWC array and close it."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))
