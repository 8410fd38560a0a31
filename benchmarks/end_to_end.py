"""End to end: epoch wall time and time to a validation balanced accuracy target with the default gMLP job.

Runs jobs/gmlp.yaml (or --mode) through the real entry point, `dogclf.train.train`, in a fresh run directory, and records per
epoch: the training pass (wall time, images/s, data loading included), the validation pass, the whole epoch (from one
epoch's start to the next: checkpoints and TensorBoard pictures included), val/balanced_accuracy and the time since
fit start. Setup (train() call -> fit start: scan and hashing, JPEG decode, model and trainer build) is reported
apart, as is the time to the first validation at or above --target.

    .venv/bin/python benchmarks/end_to_end.py [--mode gmlp] [--data ../shared/white-dogs] [--target 0.35] [--max-epochs N]
        [--device auto] [--precision auto] [--set key=value ...] [--output DIR] [--quick]

Prints markdown tables (Lightning's own log lines come first); a measurement, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from machine import machine_info  # benchmarks/machine.py, beside this script

from dogclf.config import ConfigError, JobConfig, load_job
from dogclf.data import DataError
from dogclf.train import resolve_precision, train

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICK = [("trainer.max_epochs", 2), ("data.max_per_class", 12), ("data.image_size", 32)]


class EpochTimes(pl.Callback):
    """Per training epoch: start, images, train and validation seconds, val balanced accuracy, time since fit start.
    Lightning validates inside the training epoch, before its on_train_epoch_end."""

    def __init__(self) -> None:
        self.fit_start = math.nan
        self.epochs: list[dict[str, float]] = []
        self.train_end = math.nan

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append({"start": time.perf_counter(), "images": 0})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.epochs[-1]["images"] += len(batch[1])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = self.epochs[-1]
        epoch["val_start"] = time.perf_counter()
        epoch["train_s"] = epoch["val_start"] - epoch["start"]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, now = self.epochs[-1], time.perf_counter()
        epoch["val_s"] = now - epoch["val_start"]
        epoch["val_bacc"] = float(trainer.callback_metrics["val/balanced_accuracy"])
        epoch["val_done"] = now - self.fit_start

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_end = time.perf_counter()

    def epoch_seconds(self) -> list[float]:
        """Each epoch's start to the next's (the last: to the end of training)."""
        starts = [e["start"] for e in self.epochs] + [self.train_end]
        return [b - a for a, b in itertools.pairwise(starts)]


def job(args: argparse.Namespace) -> JobConfig:
    overrides: list[str | tuple[str, Any]] = [*(QUICK if args.quick else []), ("data.root", str(args.data))]
    overrides += [("trainer.accelerator", args.device), ("trainer.precision", args.precision)]
    if args.max_epochs:
        overrides.append(("trainer.max_epochs", args.max_epochs))
    return load_job(args.mode, [*overrides, *args.set])


def report(cfg: JobConfig, timer: EpochTimes, call_start: float, call_end: float, metrics: dict[str, Any],
           target: float) -> str:
    device = torch.device("cuda" if cfg.trainer.accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available()
                          else "cpu")
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    epochs, wall = timer.epochs, timer.epoch_seconds()
    lines = [
        "# End to end", "", machine_info(device), "",
        (f"Job {cfg.name}: {cfg.model.preset}, {cfg.data.image_size} px, batch {cfg.data.batch_size}, {cfg.data.sampler} "
        f"sampler, num_workers {cfg.data.num_workers}, {precision} on {device.type}, max_per_class "
        f"{cfg.data.max_per_class}, data {cfg.data.root}."),
        ("Train s: epoch start to validation start (data loading included); epoch s: epoch start to the next epoch's "
        "start (validation, checkpoints, TensorBoard pictures included); elapsed: fit start to the end of the "
        "epoch's validation."), "",
        "| epoch | train s | train img/s | val s | epoch s | val balanced acc | elapsed s |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (e, seconds) in enumerate(zip(epochs, wall), 1):
        lines.append(f"| {i} | {e['train_s']:.2f} | {e['images'] / e['train_s']:.0f} | {e['val_s']:.2f} | "
                     f"{seconds:.2f} | {e['val_bacc']:.3f} | {e['val_done']:.1f} |")
    later = slice(1, None) if len(epochs) > 1 else slice(None)  # epoch 1 pays for warm-up
    reached = next((i for i, e in enumerate(epochs, 1) if e["val_bacc"] >= target), None)
    to_target = (f"{epochs[reached - 1]['val_done']:.1f} s after fit start (epoch {reached}; "
                 f"{epochs[reached - 1]['val_done'] + timer.fit_start - call_start:.1f} s with setup)"
                 if reached else f"not reached in {len(epochs)} epochs")
    images = sum(e["images"] for e in epochs[later])
    summary = [
        ("setup s (train() call to fit start: scan, JPEG decode, model and trainer build)",
         f"{timer.fit_start - call_start:.1f}"),
        (f"mean epoch s (epochs {'2+' if len(epochs) > 1 else '1'})", f"{sum(wall[later]) / len(wall[later]):.2f}"),
        (f"train img/s (epochs {'2+' if len(epochs) > 1 else '1'})",
         f"{images / sum(e['train_s'] for e in epochs[later]):.0f}"),
        (f"time to val balanced acc >= {target:g}", to_target),
        ("total wall s (train() call to return, test included)", f"{call_end - call_start:.1f}"),
        ("test balanced acc (last epoch's weights)", f"{metrics['test_balanced_accuracy']:.3f}"),
    ]
    lines += ["", "| summary | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in summary)]
    return "\n".join(lines)


def run(args: argparse.Namespace, run_dir: Path) -> None:
    cfg = job(args)
    if (run_dir / "checkpoints").exists():
        raise ConfigError(f"{run_dir} already holds a run (training would resume it): pass an empty --output DIR")
    timer = EpochTimes()
    call_start = time.perf_counter()
    metrics = train(cfg, run_dir=run_dir, callbacks=[timer], progress_bar=False)
    call_end = time.perf_counter()
    print("\n" + report(cfg, timer, call_start, call_end, metrics, args.target), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--mode", default="gmlp", help="job spec, as app.py's --mode (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("../shared/white-dogs"),
                        help="photo folder, one sub-folder per class; a relative path is taken from the repository "
                             "root (default: %(default)s)")
    parser.add_argument("--target", type=float, default=0.35,
                        help="validation balanced accuracy to reach (default: %(default)s)")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="epochs to train (default: the job's trainer.max_epochs; --quick: 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="trainer.accelerator (default: %(default)s)")
    parser.add_argument("--precision", default="auto",
                        help="trainer.precision, e.g. 32-true, bf16-mixed (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set data.num_workers=2 (repeatable; applied last)")
    parser.add_argument("--output", type=Path, default=None,
                        help="keep the run directory here (default: a temporary directory, deleted afterwards)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs, 12 photos per class, 32 px")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    args.data = (REPO_ROOT / args.data).resolve()  # an absolute --data stays as given
    try:
        if args.output:
            run(args, args.output.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="dogclf-e2e-") as tmp:
                run(args, Path(tmp))
    except (ConfigError, DataError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
