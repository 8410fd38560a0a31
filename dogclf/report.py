"""`dogclf report`: run directories -> one markdown table (mean +- std over seeds) and confusion-matrix PNGs."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from dogclf.config import ConfigError
from dogclf.metrics import bootstrap_intervals


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories (holding metrics.json and config.yaml) at or below each path."""
    runs = []
    for path in map(Path, paths):
        found = [m.parent for m in sorted(path.rglob("metrics.json")) if (m.parent / "config.yaml").is_file()]
        if not found:
            raise ConfigError(f"no finished run (metrics.json + config.yaml) at or below {path}")
        runs += found
    return runs


def method_label(cfg: dict[str, Any]) -> str:
    """What was done about the imbalance, from a run's config.yaml: loss (+ its knobs), weights, sampler, post-hoc."""
    optim, data = cfg["optim"], cfg["data"]
    loss = optim["loss"]
    knobs = {"focal": f"gamma={optim['focal_gamma']}", "logit_adjusted": f"tau={optim['logit_tau']}"}.get(loss)
    parts = [f"{loss}({knobs})" if knobs else loss]
    if optim["drw_epoch"] is not None:
        parts.append(f"DRW@{optim['drw_epoch']}")
    elif optim["class_weighting"] != "none":
        parts.append(f"{optim['class_weighting']} weights")
    if data["sampler"] != "shuffle":
        parts.append(f"{data['sampler']} sampler")
    if optim.get("posthoc_adjust"):
        parts.append("post-hoc tau")
    return " + ".join(parts)


def _mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarise(run_dirs: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Group runs by (architecture, method); each group: its runs' metrics and seeds. Returns (groups, classes)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    classes: list[str] = []
    for run_dir in run_dirs:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        metrics = yaml.safe_load((run_dir / "metrics.json").read_text())  # JSON is YAML
        classes = classes or metrics["classes"]
        if metrics["classes"] != classes:
            raise ConfigError(f"{run_dir} has classes {metrics['classes']}, others {classes}: report one dataset")
        key = (f"{metrics['architecture']} ({metrics['image_size']} px)", method_label(cfg))
        # Intervals recomputed from the confusion matrix: one method for every run, whichever version wrote it.
        interval = bootstrap_intervals(torch.tensor(metrics["test_confusion_matrix"]), seed=cfg["trainer"]["seed"])
        metrics["test_balanced_accuracy_ci"] = list(interval["balanced_accuracy"])
        groups[key].append({**metrics, "seed": cfg["trainer"]["seed"], "run_dir": str(run_dir)})
    ordered = [{"architecture": a, "method": m, "runs": groups[(a, m)]} for a, m in sorted(groups)]
    return ordered, classes


def markdown_table(groups: list[dict[str, Any]], classes: list[str]) -> str:
    """The seed's table, extended: losses, accuracy, balanced accuracy with its bootstrap interval, macro-F1 and
    per-class recall, each the mean +- std over the group's seeds."""
    head = ["Architecture", "Method", "Seeds", "Train Loss", "Test Loss", "Acc", "Balanced Acc (95% CI)", "Macro-F1"]
    head += [f"Recall {name}" for name in classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for group in groups:
        runs = group["runs"]
        low = statistics.mean(r["test_balanced_accuracy_ci"][0] for r in runs)
        high = statistics.mean(r["test_balanced_accuracy_ci"][1] for r in runs)
        cells = [
            group["architecture"],
            group["method"],
            str(len(runs)),
            _mean_std([r["train_loss"] for r in runs]),
            _mean_std([r["test_loss"] for r in runs]),
            _mean_std([r["test_accuracy"] for r in runs]),
            f"{_mean_std([r['test_balanced_accuracy'] for r in runs])} [{low:.2f}, {high:.2f}]",
            _mean_std([r["test_macro_f1"] for r in runs]),
        ]
        cells += [_mean_std([r["test_per_class_recall"][name] for r in runs], 2) for name in classes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_confusion_pngs(groups: list[dict[str, Any]], classes: list[str], out_dir: Path) -> list[Path]:
    """One PNG per group: the test confusion matrices of its seeds, summed."""
    import matplotlib.pyplot as plt

    from dogclf.metrics import confusion_matrix_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for group in groups:
        total = sum(torch.tensor(r["test_confusion_matrix"]) for r in group["runs"])
        title = f"{group['architecture']} | {group['method']} | {len(group['runs'])} seed(s), test"
        slug = "".join(c if c.isalnum() else "-" for c in f"{group['architecture']}-{group['method']}").strip("-")
        path = out_dir / f"confusion-{slug}.png"
        figure = confusion_matrix_figure(total, classes, title)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        paths.append(path)
    return paths
