"""The LightningModule: what to learn. It knows the model, the loss, the optimiser and the metrics —
nothing about data locations, devices or clusters."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchmetrics.classification import MulticlassConfusionMatrix

from dogclf.losses import build_loss, log_prior, tune_tau
from dogclf.metrics import classification_metrics
from dogclf.models import create_model

EVAL_STAGES = ("val", "test")
MODEL_OVERRIDES = ("drop_path_rate", "attn_dim", "hidden_sizes", "dropout")  # model config fields passed to the preset


def model_overrides(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The `model` config fields that override preset arguments (None keeps the preset's value)."""
    return {key: model_cfg[key] for key in MODEL_OVERRIDES}


class DogClassifier(pl.LightningModule):
    """Image classifier over `classes` with any registered model preset.

    `model_cfg` and `optim_cfg` are the `model` and `optim` sections of the job config as plain dicts,
    so `DogClassifier.load_from_checkpoint(path)` rebuilds the same network without the job spec.
    """

    def __init__(
        self,
        *,
        model_cfg: dict[str, Any],
        optim_cfg: dict[str, Any],
        classes: list[str],
        class_counts: list[int],
        image_size: int,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)  # the trainer logs the whole job config as hparams at the end
        self.classes = list(classes)
        self.optim_cfg = optim_cfg
        self.model = create_model(
            model_cfg["preset"],
            num_classes=len(classes),
            image_size=image_size,
            **model_overrides(model_cfg),
        )
        decay = optim_cfg.get("ema_decay")
        # EMA weights live in the module so checkpoints, resume and load_from_checkpoint carry them for free.
        self.ema = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if decay else None
        )
        self.criterion = build_loss(
            optim_cfg["loss"],
            class_counts=class_counts,
            label_smoothing=optim_cfg["label_smoothing"],
            weighting=optim_cfg["class_weighting"],
            beta=optim_cfg["cb_beta"],
            focal_gamma=optim_cfg["focal_gamma"],
            tau=optim_cfg["logit_tau"],
            ldam_max_margin=optim_cfg["ldam_max_margin"],
            ldam_scale=optim_cfg["ldam_scale"],
            drw_epoch=optim_cfg["drw_epoch"],
        )
        self.confusion = torch.nn.ModuleDict(
            {stage: MulticlassConfusionMatrix(num_classes=len(classes)) for stage in EVAL_STAGES}
        )
        self.eval_results: dict[str, dict[str, Any]] = {}  # stage -> {"loss", "confusion", metrics...}
        self.train_loss = math.nan  # mean training loss of the last finished epoch, over all ranks
        self.register_buffer("_train_loss_sum", torch.zeros(2), persistent=False)  # (loss sum, count) this epoch
        self._eval_loss: dict[str, list[torch.Tensor]] = {stage: [] for stage in EVAL_STAGES}
        # Post-hoc logit adjustment: evaluation logits minus this offset (tau * log prior once tuned, else 0).
        self.register_buffer("logit_offset", torch.zeros(len(classes)))
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []  # this validation epoch's (logits, labels)
        self.val_logits: tuple[torch.Tensor, torch.Tensor] | None = None  # the last epoch's, from every rank

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits; evaluation uses the EMA weights when EMA is on."""
        if self.ema is not None and not self.training:
            return self.ema.module(images)
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.criterion(self.model(images), labels)
        if not torch.isfinite(loss):  # stop before a NaN reaches the weights and the next checkpoint
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (epoch {self.current_epoch}): lower "
                "optim.lr or set optim.grad_clip; checkpoints/last.ckpt still holds the last good epoch"
            )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=labels.numel())
        self._train_loss_sum += torch.stack([loss.detach() * labels.numel(), loss.new_tensor(labels.numel())])
        return loss

    def on_train_epoch_start(self) -> None:
        self.criterion.set_epoch(self.current_epoch)  # deferred re-weighting switches on by epoch (also on resume)

    def on_train_epoch_end(self) -> None:
        loss_sum, count = self.all_gather(self._train_loss_sum).reshape(-1, 2).sum(dim=0)
        self.train_loss = (loss_sum / count).item()
        self._train_loss_sum.zero_()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["train_loss"] = self.train_loss
        checkpoint["train_loss_sum"] = self._train_loss_sum.tolist()  # a checkpoint written mid-epoch goes on with it

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_loss = checkpoint.get("train_loss", math.nan)
        self._train_loss_sum.copy_(torch.tensor(checkpoint.get("train_loss_sum", [0.0, 0.0])))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, stage: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        images, labels = batch
        raw = self(images).float()
        if stage == "val":
            self._val_outputs.append((raw.detach().cpu(), labels.cpu()))
        logits = raw - self.logit_offset
        # Unsmoothed cross-entropy: the honest loss of the predicted distribution.
        loss = F.cross_entropy(logits, labels, reduction="sum")
        self._eval_loss[stage].append(torch.stack([loss.detach(), torch.tensor(labels.numel(), device=loss.device)]))
        self.confusion[stage].update(logits.argmax(dim=1), labels)

    def _eval_epoch_end(self, stage: str) -> None:
        if stage == "val":
            self.val_logits = _gather_outputs(self._val_outputs, len(self.classes))
            self._val_outputs = []
        confusion = self.confusion[stage].compute()  # summed over ranks
        self.confusion[stage].reset()
        parts = self._eval_loss[stage] or [torch.zeros(2, device=self.device)]  # a rank may get no batch at all
        loss_sum, count = torch.stack(parts).sum(dim=0)
        self._eval_loss[stage].clear()
        loss_sum, count = self.all_gather(torch.stack([loss_sum, count])).reshape(-1, 2).sum(dim=0)
        metrics = classification_metrics(confusion, self.classes)
        self.eval_results[stage] = {"loss": (loss_sum / count).item(), "confusion": confusion.cpu(), **metrics}
        scalars = {"loss": loss_sum / count, **{k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}}
        for name in self.classes:
            if metrics["per_class_support"][name] > 0:  # recall of a class absent from the split is undefined
                scalars[f"recall/{name}"] = metrics["per_class_recall"][name]
            scalars[f"precision/{name}"] = metrics["per_class_precision"][name]
        # Values are already global (confusion matrix and loss were reduced over ranks): no sync_dist needed.
        self.log_dict({f"{stage}/{k}": float(v) for k, v in scalars.items()}, prog_bar=False)
        self.log(f"{stage}/bacc", float(metrics["balanced_accuracy"]), prog_bar=True, logger=False)

    def tune_posthoc_adjustment(self) -> tuple[float, float]:
        """Pick tau for `logits - tau * log(prior)` on the last validation epoch (max balanced accuracy) and use it
        from now on; returns (tau, validation balanced accuracy with it)."""
        if self.val_logits is None:
            raise RuntimeError("post-hoc adjustment needs a validation epoch first")
        counts = self.hparams.class_counts
        tau, balanced_accuracy = tune_tau(*self.val_logits, counts)
        self.logit_offset.copy_(tau * log_prior(counts).to(self.logit_offset.device))
        return tau, balanced_accuracy

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        optimizer = build_adamw(self.model, cfg, precision=self.trainer.precision)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup_steps = int(total_steps * cfg["warmup_epochs"] / max(1, self.trainer.max_epochs))
        schedule = warmup_cosine(total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=cfg["min_lr_ratio"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_adamw(model: torch.nn.Module, optim_cfg: dict[str, Any], *, precision: str) -> torch.optim.AdamW:
    """The training optimiser: AdamW without weight decay on norms, biases and the SGU gate bias (1-d tensors), as
    timm and DeiT. Fused (one kernel for all parameters) unless fp16 loss scaling (`precision` 16-mixed: a GradScaler)
    would refuse gradient clipping with it."""
    trained = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [
            {"params": [p for p in trained if p.ndim > 1], "weight_decay": optim_cfg["weight_decay"]},
            {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=optim_cfg["lr"],
        betas=tuple(optim_cfg["betas"]),
        fused=precision != "16-mixed",
    )


def _gather_outputs(outputs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int):
    """This rank's (logits, labels) batches -> all ranks' (N, C) logits and (N,) labels, on every rank."""
    logits = torch.cat([o[0] for o in outputs]) if outputs else torch.zeros(0, num_classes)
    labels = torch.cat([o[1] for o in outputs]) if outputs else torch.zeros(0, dtype=torch.long)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (logits, labels))
        logits, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logits, labels


def warmup_cosine(*, total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
