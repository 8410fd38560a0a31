"""Side concerns of training, kept out of the LightningModule: throughput, pictures in TensorBoard, a record of
where the run ran, and a one-line epoch log for batch jobs."""

from __future__ import annotations

import itertools
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dogclf.data.sampling import EpochSampler
from dogclf.metrics import confusion_matrix_figure, figure_to_array


class Throughput(pl.Callback):
    """Logs training images per second (all ranks together) for each epoch, data loading included."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()
        self._images = 0

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch starts without an epoch start

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


def _validation_outputs(trainer: pl.Trainer, pl_module: pl.LightningModule):
    """(probabilities (N, C), labels (N,)) of the last validation epoch on rank 0 with a TensorBoard logger, from
    the logits the module gathered from all ranks (`val_logits`, minus its `logit_offset` as evaluation does)."""
    outputs = getattr(pl_module, "val_logits", None)
    if (trainer.sanity_checking or not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger)
            or outputs is None or len(outputs[1]) == 0):
        return None
    logits, labels = outputs
    offset = getattr(pl_module, "logit_offset", None)
    if offset is not None:
        logits = logits.float() - offset.detach().float().cpu()
    return logits.float().softmax(dim=1), labels


class MisclassifiedImages(pl.Callback):
    """A TensorBoard image (`val/misclassified`) of up to `max_images` validation images the model got wrong, each
    titled with its true class, the predicted class and its probability, every `every_n_epochs` validation epochs.

    Rank 0 only, and cheap: predictions come from the logits the module already gathered (`val_logits`), pixels from
    the datamodule's decoded uint8 cache (center-cropped as evaluation does, so nothing to denormalise). Mistakes
    are taken round-robin over the true classes, most confident first, so that rare classes show up.
    """

    def __init__(self, max_images: int = 16, every_n_epochs: int = 1) -> None:
        self.max_images = max_images
        self.every_n_epochs = every_n_epochs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch % self.every_n_epochs:
            return
        outputs = _validation_outputs(trainer, pl_module)
        dataset = getattr(getattr(trainer, "datamodule", None), "datasets", {}).get("val")
        if outputs is None or dataset is None or len(dataset) != len(outputs[1]):
            return
        probabilities, labels = outputs
        # The gathered order: rank 0's shard, then rank 1's... (ShardSampler gives rank r the items r, r + W, ...).
        world = trainer.world_size
        order = [i for rank in range(world) for i in range(rank, len(dataset), world)]
        if [dataset.labels[i] for i in order] != labels.tolist():  # not the layout this relies on: draw nothing
            return
        confidence, predicted = (t.tolist() for t in probabilities.max(dim=1))
        truth = labels.tolist()
        wrong = [i for i, (p, t) in enumerate(zip(predicted, truth)) if p != t]
        by_class = [sorted((i for i in wrong if truth[i] == c), key=lambda i: -confidence[i])
                    for c in range(probabilities.shape[1])]
        picked = [i for group in itertools.zip_longest(*by_class) for i in group if i is not None][: self.max_images]
        classes = pl_module.classes
        cells = [
            (dataset.images[order[i]], f"{classes[truth[i]]}\n-> {classes[predicted[i]]} {confidence[i]:.2f}")
            for i in picked
        ]
        title = (f"val epoch {trainer.current_epoch}: {len(wrong)} of {len(labels)} misclassified"
                 + (f" (showing {len(cells)})" if len(cells) < len(wrong) else ""))
        image = figure_to_array(_image_grid(cells, int(pl_module.hparams.image_size), title))
        trainer.logger.experiment.add_image("val/misclassified", image, trainer.global_step, dataformats="HWC")


def _image_grid(cells: list[tuple[torch.Tensor, str]], image_size: int, title: str, columns: int = 4):
    """A matplotlib figure: uint8 CHW images (center-cropped to `image_size`), each with its caption below.

    One mosaic in one axes: a subplot per image made the default job's validation pass 0.7 s slower per epoch
    (benchmarks/end_to_end.py, docs/performance.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.transforms.v2.functional import center_crop

    columns = max(1, min(columns, len(cells)))
    rows = max(1, -(-len(cells) // columns))
    size, gap, caption_height = image_size, 4, image_size // 2  # pixels of the mosaic
    mosaic = torch.full((3, rows * (size + caption_height), columns * (size + gap) + gap), 255, dtype=torch.uint8)
    fig, ax = plt.subplots(figsize=(2.2 * columns, 2.5 * rows + 0.4), dpi=80)
    ax.axis("off")
    for k, (image, caption) in enumerate(cells):
        row, column = divmod(k, columns)
        top, left = row * (size + caption_height), gap + column * (size + gap)
        mosaic[:, top : top + size, left : left + size] = center_crop(image, [size, size])
        ax.text(left + size / 2, top + size + 2, caption, ha="center", va="top", fontsize=8)
    ax.imshow(mosaic.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95)
    return fig


class PrecisionRecallCurves(pl.Callback):
    """One TensorBoard precision-recall curve per class (`val/pr_curve/<class>`, one-vs-rest on the softmax
    probabilities) for every validation epoch, from the logits the module already gathered. Rank 0 only."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        outputs = _validation_outputs(trainer, pl_module)
        if outputs is None:
            return
        probabilities, labels = outputs
        writer = trainer.logger.experiment
        for index, name in enumerate(pl_module.classes):
            writer.add_pr_curve(f"val/pr_curve/{name}", labels == index, probabilities[:, index], trainer.global_step)


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

    on_train_start = on_train_epoch_start  # a run resumed mid-epoch starts without an epoch start

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


class CheckpointOnSignal(pl.Callback):
    """Local runs: Ctrl-C (SIGINT) or SIGTERM ends training after the current batch with the state saved to `path`;
    `signum` then names the signal. A second Ctrl-C stops at once (KeyboardInterrupt; the last checkpoint stays).

    The stop is Lightning's own on SIGTERM (it ends the batch, then raises SIGTERMException), asked for only after a
    batch that is not the last of its epoch: a checkpoint written there resumes exactly (see `ResumeSampler`), while
    one written inside the epoch-end validation would not. A signal in an epoch's last batch or its validation stops
    after the next batch, or before testing when training is over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.signum: int | None = None
        self._saved_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # only the main thread can take signals
            for signum in (signal.SIGINT, signal.SIGTERM):  # Lightning puts the previous handlers back after fit
                signal.signal(signum, self._request_stop)

    def _request_stop(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT == self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this batch (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.signum is not None and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler sets

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.signum is not None:  # it came in the last batch or the last validation: stop before testing
            raise SIGTERMException

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        requested = isinstance(exception, SIGTERMException) and self.signum is not None
        if requested and self._saved_step != trainer.global_step:  # not just saved at the epoch's end
            trainer.save_checkpoint(self.path, weights_only=False)


class ResumeSampler(pl.Callback):
    """A resumed run trains the epoch it continues, and from a mid-epoch checkpoint (`CheckpointOnSignal`) only the
    batches its sampler had not served yet. Lightning restores the loop's progress (the epoch still ends after its
    usual number of batches) but a plain DataLoader has no position to restore, and with loader workers it drew
    the first batches before `set_epoch`: the sampler is told where to go on and the iterator is made again."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        if trainer.ckpt_path is None or not isinstance(getattr(loader, "sampler", None), EpochSampler):
            return
        loop = trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed if loop.restarted_mid_epoch else 0
        loader.sampler.resume(trainer.current_epoch, done * loader.batch_size)
        iter(loop._data_fetcher)  # Lightning made the iterator before the checkpoint's epoch was known
