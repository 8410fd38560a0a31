"""Side concerns of training, kept out of the LightningModule: throughput, pictures in TensorBoard, a record of
where the run ran, and a one-line epoch log for batch jobs."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from dogclf.metrics import confusion_matrix_figure, figure_to_array


class Throughput(pl.Callback):
    """Logs training images per second (all ranks together) for each epoch, data loading included."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += len(batch[1])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        if self._images and seconds > 0:
            pl_module.log("perf/train_images_per_s", self._images * trainer.world_size / seconds)
            pl_module.log("perf/epoch_seconds", seconds)


class ConfusionMatrixImages(pl.Callback):
    """Draws the confusion matrix of every validation epoch and of the test run into TensorBoard."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._draw(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")

    @staticmethod
    def _draw(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        result = getattr(pl_module, "eval_results", {}).get(stage)
        logger = trainer.logger
        if result is None or not trainer.is_global_zero or not isinstance(logger, TensorBoardLogger):
            return
        title = f"{stage} epoch {trainer.current_epoch}  balanced acc {result['balanced_accuracy']:.3f}"
        image = figure_to_array(confusion_matrix_figure(result["confusion"], pl_module.classes, title))
        logger.experiment.add_image(f"{stage}/confusion_matrix", image, trainer.global_step, dataformats="HWC")


PACKAGES = ("torch", "torchvision", "pytorch-lightning", "lightning-fabric", "torchmetrics", "submitit", "numpy")


class RunEnvironment(pl.Callback):
    """Writes `env` in the run directory (rank 0, each (re)start): git commit, package versions, every rank's host
    and device, and the SLURM_* / SUBMITIT_* variables — what is needed to tell which code ran where."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        rank = {
            "hostname": socket.gethostname(),
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "device": str(trainer.strategy.root_device),
        }
        ranks = [rank]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, rank)
        if trainer.is_global_zero:
            lines = [f"git_commit={git_commit()}", f"python={platform.python_version()}", f"argv={' '.join(sys.argv)}"]
            lines += [f"{name}={_version(name)}" for name in PACKAGES]
            lines += [f"world_size={trainer.world_size}", f"num_nodes={trainer.num_nodes}"]
            lines += [f"rank{i}.{key}={value}" for i, info in enumerate(ranks) for key, value in info.items()]
            lines += [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("SLURM_", "SUBMITIT_"))]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("\n".join(lines) + "\n")
            os.replace(tmp, self.path)


def git_commit() -> str:
    """The commit of the code that runs (`+dirty` with uncommitted changes), or `unknown` outside a checkout."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=source,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


class EpochSummary(pl.Callback):
    """One line per epoch on rank 0 (for batch-job logs, where a progress bar is noise)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", f"step {trainer.global_step}"]
        for key, label in (("train/loss_epoch", "train_loss"), ("val/loss", "val_loss"),
                           ("val/balanced_accuracy", "val_bal_acc")):
            if key in metrics:
                parts.append(f"{label} {float(metrics[key]):.4f}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        print(" | ".join(parts), flush=True)


class RankRecorder(pl.Callback):
    """Keeps, on each rank, what that rank trained on in this attempt: ranks, host, Slurm node id, and the sample
    indices of its first epoch, read from the sampler the trainer iterates. A cluster job returns `report`."""

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "first_epoch" in self.report:
            return
        self.report.update(
            global_rank=trainer.global_rank,
            local_rank=trainer.local_rank,
            node_rank=trainer.node_rank,
            world_size=trainer.world_size,
            hostname=socket.gethostname(),
            slurm_node_id=os.environ.get("SLURM_NODEID"),
            first_epoch=trainer.current_epoch,
            first_epoch_indices=list(trainer.train_dataloader.sampler),
            start_step=trainer.global_step,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.report.update(global_step=trainer.global_step, epochs=trainer.current_epoch)


class KeepClusterSignals(pl.Callback):
    """Gives SIGTERM back to the job's launcher once training starts.

    Lightning's SIGTERM handler broadcasts to all ranks from inside the handler; on a requeue Slurm SIGTERMs every
    task while rank 0 is already exiting, so that broadcast fails with "Connection closed by peer". submitit
    ignores SIGTERM by design (its USR2 handler does the requeue) and a plain process should just stop: both are
    the handler that was installed before Lightning replaced it.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._handler = signal.getsignal(signal.SIGTERM)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._handler is not None:
            signal.signal(signal.SIGTERM, self._handler)
