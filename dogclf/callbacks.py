"""Side concerns of training, kept out of the LightningModule: throughput and pictures in TensorBoard."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
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
