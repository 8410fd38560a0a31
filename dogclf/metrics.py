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
