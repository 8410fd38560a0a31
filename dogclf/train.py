"""The one training entry point: `train(cfg)` builds data, model and trainer, fits (resuming from the run
directory when it holds a checkpoint), tests and writes `metrics.json`. app.py, `dogclf train` and the
cluster launchers all end up here."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import Strategy

from dogclf.callbacks import ConfusionMatrixImages, EpochSummary, RunEnvironment, Throughput
from dogclf.checkpointing import AtomicCheckpointIO, resume_checkpoint
from dogclf.config import ConfigError, JobConfig, save_config
from dogclf.data import WhiteDogsDataModule
from dogclf.models import create_model, load_pretrained
from dogclf.module import DogClassifier, model_overrides

MONITOR = "val/balanced_accuracy"
TABLE_COLUMNS = ("Architecture", "Train Loss", "Val Loss", "Test Loss", "Test Acc", "Balanced Acc", "Macro-F1")


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16-mixed where the hardware supports it (Ampere+ GPUs, bf16 CPUs), 16-mixed on older GPUs, else 32."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def default_run_dir(cfg: JobConfig) -> Path:
    """`<output>/<name>`: where a local run lives (cluster jobs add their job id below it)."""
    return Path(cfg.output).expanduser().resolve() / cfg.name


def prepare_run_dir(run_dir: Path) -> Path:
    """Create `run_dir` or fail with a message that says how to fix it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as err:
        raise ConfigError(
            f"output directory {run_dir} is not writable ({err.strerror}): pass --output DIR on writable storage"
        ) from None
    return run_dir


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def build_trainer(
    cfg: JobConfig,
    run_dir: Path,
    *,
    num_nodes: int = 1,
    strategy: str | Strategy = "auto",
    plugins: Sequence[Any] = (),
    callbacks: Sequence[pl.Callback] = (),
    progress_bar: bool = True,
) -> pl.Trainer:
    """Where and how to train: devices and nodes, precision, logging, checkpoints."""
    # Two savers: Lightning 2.6 refreshes `save_last` only when a top-k file is written, so `last.ckpt` gets a
    # saver of its own. Both save after the epoch's validation has finished: a checkpoint written during
    # validation makes the resumed run validate that epoch again.
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False, save_on_train_epoch_end=True
    )
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best-epoch{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=MONITOR,
        mode="max",
        save_on_train_epoch_end=True,
    )
    return pl.Trainer(
        default_root_dir=run_dir,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=num_nodes,
        strategy=strategy,
        # The datamodule shards every loader itself (dogclf.data.sampling): Lightning must not swap its samplers.
        use_distributed_sampler=False,
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        max_epochs=cfg.trainer.max_epochs,
        gradient_clip_val=cfg.optim.grad_clip,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=TensorBoardLogger(save_dir=run_dir, name="tb", version="", default_hp_metric=False),
        callbacks=[
            best,
            last,
            LearningRateMonitor(logging_interval="step"),
            Throughput(),
            ConfusionMatrixImages(),
            RunEnvironment(run_dir / "env"),
            *([] if progress_bar else [EpochSummary()]),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(), *plugins],
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        enable_model_summary=True,
    )


def train(cfg: JobConfig, *, run_dir: Path | None = None, **placement: Any) -> dict[str, Any]:
    """Train `cfg` in `run_dir` (default `<output>/<name>`), continuing from its last checkpoint if there is one.

    `placement` (num_nodes, strategy, plugins, callbacks, progress_bar) goes to `build_trainer`; cluster jobs pass it.
    Returns the metrics (on every rank; rank 0 writes them).
    """
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    # Check the model against the image size before the (slower) data indexing, and everything before writing.
    spec = cfg.to_dict()
    create_model(cfg.model.preset, num_classes=2, image_size=cfg.data.image_size, **model_overrides(spec["model"]))
    data = WhiteDogsDataModule(cfg.data, seed=cfg.trainer.seed)
    data.setup()
    run_dir = prepare_run_dir(run_dir or default_run_dir(cfg))
    trainer = build_trainer(cfg, run_dir, **placement)
    module = DogClassifier(
        model_cfg=spec["model"],
        optim_cfg=spec["optim"],
        classes=data.classes,
        class_counts=data.train_class_counts,
        image_size=cfg.data.image_size,
    )
    resume = resume_checkpoint(run_dir)
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
        data.write_split_csv(run_dir / "split.csv")
    if resume is None and cfg.model.init_from:
        print(load_pretrained(module.model, cfg.model.init_from))
    elif resume is not None:
        print(f"Resuming from {resume}")

    trainer.fit(module, datamodule=data, ckpt_path=resume)
    if "val" not in module.eval_results:  # the run was already complete: evaluate what it ended with
        trainer.validate(module, datamodule=data, verbose=False)
    trainer.test(module, datamodule=data, verbose=False)

    metrics = collect_metrics(cfg, trainer, module, run_dir)
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        trainer.logger.log_hyperparams(hparams(cfg), {f"hp/{k}": v for k, v in metrics.items() if _is_number(v)})
        trainer.logger.finalize("success")
    return metrics


def collect_metrics(cfg: JobConfig, trainer: pl.Trainer, module: DogClassifier, run_dir: Path) -> dict[str, Any]:
    """The final model's numbers (last epoch's weights, EMA when on) for metrics.json and the table."""
    val, test = module.eval_results["val"], module.eval_results["test"]
    checkpoint = trainer.checkpoint_callback
    best_score = checkpoint.best_model_score
    return {
        "architecture": cfg.model.preset,
        "image_size": cfg.data.image_size,
        "classes": module.classes,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_loss": module.train_loss,
        "val_loss": val["loss"],
        "val_accuracy": val["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "val_macro_f1": val["macro_f1"],
        "test_loss": test["loss"],
        "test_accuracy": test["accuracy"],
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_macro_f1": test["macro_f1"],
        "test_per_class_recall": test["per_class_recall"],
        "test_per_class_precision": test["per_class_precision"],
        "test_per_class_support": test["per_class_support"],
        "test_confusion_matrix": test["confusion"].tolist(),
        "best_val_balanced_accuracy": float(best_score) if best_score is not None else math.nan,
        "best_checkpoint": os.path.relpath(checkpoint.best_model_path, run_dir) if checkpoint.best_model_path else None,
        "run_dir": str(run_dir),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def hparams(cfg: JobConfig) -> dict[str, Any]:
    """The job config flattened to TensorBoard-friendly scalars and strings."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.flat().items()}


def results_table(rows: list[dict[str, Any]]) -> str:
    """The seed's results table, extended with validation loss and imbalance-aware metrics (markdown)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    for m in rows:
        cells = [
            f"{m['architecture']} ({m['image_size']} px)",
            f"{m['train_loss']:.3f}",
            f"{m['val_loss']:.3f}",
            f"{m['test_loss']:.3f}",
            f"{m['test_accuracy']:.3f}",
            f"{m['test_balanced_accuracy']:.3f}",
            f"{m['test_macro_f1']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
