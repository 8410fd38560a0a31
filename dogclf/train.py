"""The one training entry point: `train(cfg)` builds data, model and trainer, fits (resuming from the run
directory when it holds a checkpoint), tests and writes `metrics.json`. app.py, `dogclf train` and the
cluster launchers all end up here."""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import math
import os
import signal
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import Strategy
from pytorch_lightning.utilities.exceptions import SIGTERMException

from dogclf.callbacks import (
    CheckpointOnSignal,
    ConfusionMatrixImages,
    EpochSummary,
    MisclassifiedImages,
    PrecisionRecallCurves,
    ResumeSampler,
    RunEnvironment,
    Throughput,
)
from dogclf.checkpointing import AtomicCheckpointIO, resume_checkpoint
from dogclf.config import ConfigError, JobConfig, StorageError, save_config, writable_dir
from dogclf.data import WhiteDogsDataModule
from dogclf.data.sampling import SAMPLER_POWERS
from dogclf.losses import class_weights, ldam_margins, log_prior
from dogclf.metrics import bootstrap_intervals, shot_group_recall, wilson_interval
from dogclf.models import create_model, load_pretrained
from dogclf.module import MODEL_OVERRIDES, DogClassifier, model_overrides

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


class Interrupted(Exception):
    """A local run stopped by a signal, its checkpoint saved; `exit_status` is the shell's 128 + signal number."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.exit_status = 128 + signum
        name = signal.Signals(signum).name
        if checkpoint.is_file():
            step = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["global_step"]
            super().__init__(f"interrupted ({name}) at step {step}; checkpoint saved to {checkpoint}; run the same "
                             "command again to resume")
        else:
            super().__init__(f"interrupted ({name}) before the first checkpoint; run the same command again to start")


@contextmanager
def claim_run_dir(path: Path) -> Iterator[Path]:
    """Hold `path` for this process, or when another run holds it, a new `<path>-2`, `<path>-3`...

    The hold is an flock on `.lock` inside: the kernel drops it when the process ends, even on kill -9, so the same
    command run again later gets `path` and resumes there; two runs at once never share a directory.
    """
    for n in itertools.count(1):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        if n == 1:
            writable_dir(candidate)
        else:
            try:
                candidate.mkdir()  # only a new folder: never another run's
            except FileExistsError:
                continue
        lock = os.open(candidate / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            os.close(lock)
    if candidate != path:
        print(f"{path} is in use by another run: this run uses {candidate} (resume it with --name {candidate.name})")
    try:
        yield candidate
    finally:
        os.close(lock)


@contextmanager
def storage_errors_reported(run_dir: Path) -> Iterator[None]:
    """A full disk or a removed folder met by any writer (checkpoint, TensorBoard, metrics) as a StorageError saying
    what to do; checkpoints are written atomically, so the last one on disk is whole."""
    previous_hook = threading.excepthook
    # TensorBoard's writer thread dies printing the OSError that the main thread meets next and reports below.
    threading.excepthook = lambda args: None if storage_errno(args.exc_value) else previous_hook(args)
    try:
        yield
    except OSError as err:
        folders = Path(err.filename).parents if isinstance(err.filename, str) else [run_dir]
        missing = [folder for folder in folders if not folder.is_dir()]  # nearest first
        if storage_errno(err) == errno.ENOENT and missing:
            raise StorageError(f"{missing[-1]} was removed during the run: nothing more can be saved there; run the "
                               "same command again to start the run afresh") from err
        if storage_errno(err) in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(f"no space left on the disk of {run_dir}: free space, then run the same command again "
                               "to resume from the last checkpoint, which is intact") from err
        raise
    finally:
        threading.excepthook = previous_hook


def storage_errno(err: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT (no space left), ENOENT (a folder gone) when `err` is such an OSError, else None."""
    return err.errno if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOENT) else None


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
            MisclassifiedImages(),
            PrecisionRecallCurves(),
            RunEnvironment(run_dir / "env"),
            ResumeSampler(),
            *([] if progress_bar else [EpochSummary()]),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(), *plugins],
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        enable_model_summary=True,
    )


def train(cfg: JobConfig, *, run_dir: Path | None = None, **placement: Any) -> dict[str, Any]:
    """Train `cfg` in `run_dir`, continuing from its last checkpoint if there is one, then test; returns the metrics
    (on every rank; rank 0 writes them).

    Without `run_dir`, a local run in `<output>/<name>`. With one device it holds that directory (`claim_run_dir`),
    and Ctrl-C or SIGTERM saves a checkpoint and raises `Interrupted`. `placement` (num_nodes, strategy, plugins,
    callbacks, progress_bar) goes to `build_trainer`; cluster jobs pass it with their `run_dir`.
    """
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    # Check the model against the image size before the (slower) data indexing, and everything before writing.
    spec = cfg.to_dict()
    create_model(cfg.model.preset, num_classes=2, image_size=cfg.data.image_size, **model_overrides(spec["model"]))
    data = WhiteDogsDataModule(cfg.data, seed=cfg.trainer.seed)
    data.setup()
    if run_dir is not None or cfg.trainer.devices > 1:  # a cluster job, or local ranks sharing <output>/<name>
        run_dir = writable_dir(run_dir or default_run_dir(cfg))
        with storage_errors_reported(run_dir):
            return fit_and_test(cfg, data, run_dir, **placement)
    with claim_run_dir(default_run_dir(cfg)) as run_dir, storage_errors_reported(run_dir):
        stop = CheckpointOnSignal(run_dir / "checkpoints" / "last.ckpt")
        callbacks = [*placement.pop("callbacks", ()), stop]
        try:
            return fit_and_test(cfg, data, run_dir, callbacks=callbacks, **placement)
        except SIGTERMException:  # Lightning's stop: asked for by `stop` in training, on SIGTERM anywhere else
            raise Interrupted(stop.signum or signal.SIGTERM, stop.path) from None


def fit_and_test(cfg: JobConfig, data: WhiteDogsDataModule, run_dir: Path, **placement: Any) -> dict[str, Any]:
    """`train` once the data is ready and the run directory chosen."""
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    trainer = build_trainer(cfg, run_dir, **placement)
    spec = cfg.to_dict()
    module = DogClassifier(
        model_cfg=spec["model"],
        optim_cfg=spec["optim"],
        classes=data.classes,
        class_counts=data.train_class_counts,
        image_size=cfg.data.image_size,
    )
    resume = resume_checkpoint(run_dir)
    if resume is not None:
        check_same_model(resume, module.hparams)
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
        data.write_split_csv(run_dir / "split.csv")
        write_json(run_dir / "class_stats.json", class_stats(data.classes, data.train_class_counts, cfg))
    if resume is None and cfg.model.init_from:
        print(load_pretrained(module.model, cfg.model.init_from))
    elif resume is not None:
        print(f"Resuming from {resume}")

    with warnings.catch_warnings():  # ResumeSampler does resume a mid-epoch run's loader exactly
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    if "val" not in module.eval_results:  # the run was already complete: evaluate what it ended with
        trainer.validate(module, datamodule=data, verbose=False)
    posthoc = module.tune_posthoc_adjustment() if cfg.optim.posthoc_adjust else None
    trainer.test(module, datamodule=data, verbose=False)

    metrics = collect_metrics(cfg, trainer, module, run_dir)
    if posthoc is not None:
        metrics["posthoc_tau"], metrics["val_balanced_accuracy_posthoc"] = posthoc
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        trainer.logger.log_hyperparams(hparams(cfg), {f"hp/{k}": v for k, v in flat_numbers(metrics).items()})
        trainer.logger.finalize("success")
    return metrics


def check_same_model(checkpoint: Path, hparams: Any) -> None:
    """Refuse to resume a checkpoint of another network or class list, saying what differs and how to fix it."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    fields = {"classes": lambda h: list(h["classes"]), "image_size": lambda h: h["image_size"]}
    fields.update({f"model.{k}": (lambda h, k=k: h["model_cfg"][k]) for k in ("preset", *MODEL_OVERRIDES)})
    differ = [f"{name} {get(saved)!r} -> {get(hparams)!r}" for name, get in fields.items() if get(saved) != get(hparams)]
    if differ:
        raise ConfigError(
            f"{checkpoint} was trained with other settings ({'; '.join(differ)}): start a new run with another "
            "--name, or resume with the original settings"
        )


def class_stats(classes: list[str], counts: list[int], cfg: JobConfig) -> dict[str, Any]:
    """What the imbalance handling derived from the training split: counts, prior, loss weights, sampling share."""
    optim = cfg.optim
    weights = class_weights(counts, optim.class_weighting, optim.cb_beta).tolist()
    drw = class_weights(counts, "effective_number", optim.cb_beta).tolist() if optim.drw_epoch is not None else None
    draw = [n * n ** -SAMPLER_POWERS[cfg.data.sampler] for n in counts]
    return {
        "classes": classes,
        "train_counts": counts,
        "prior": [n / sum(counts) for n in counts],
        "sampler": cfg.data.sampler,
        "sampled_share": [d / sum(draw) for d in draw],  # expected share of each class in a training epoch
        "loss": optim.loss,
        "loss_weights": weights,  # optim.class_weighting (normalised to sum to the number of classes)
        "drw_weights_from_epoch": {"epoch": optim.drw_epoch, "weights": drw} if drw else None,
        "logit_offsets": (optim.logit_tau * log_prior(counts)).tolist() if optim.loss == "logit_adjusted" else None,
        "ldam_margins": ldam_margins(counts, optim.ldam_max_margin).tolist() if optim.loss == "ldam" else None,
    }


def collect_metrics(cfg: JobConfig, trainer: pl.Trainer, module: DogClassifier, run_dir: Path) -> dict[str, Any]:
    """The final model's numbers (last epoch's weights, EMA when on) for metrics.json and the table."""
    val, test = module.eval_results["val"], module.eval_results["test"]
    checkpoint = trainer.checkpoint_callback
    best_score = checkpoint.best_model_score
    train_counts = dict(zip(module.classes, module.hparams.class_counts))
    hits = test["confusion"].diag().tolist()
    intervals = bootstrap_intervals(test["confusion"], seed=cfg.trainer.seed)
    recall_intervals = {
        name: wilson_interval(int(hits[i]), test["per_class_support"][name]) for i, name in enumerate(module.classes)
    }
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
        # 95 % intervals: percentile bootstrap over test images, Wilson per class (one or two images -> wide)
        **{f"test_{key}_ci": list(interval) for key, interval in intervals.items()},
        "test_per_class_recall_ci": {name: list(interval) for name, interval in recall_intervals.items()},
        "test_shot_group_recall": shot_group_recall(test["per_class_recall"], train_counts),
        "train_class_counts": train_counts,
        "best_val_balanced_accuracy": float(best_score) if best_score is not None else math.nan,
        "best_checkpoint": os.path.relpath(checkpoint.best_model_path, run_dir) if checkpoint.best_model_path else None,
        "run_dir": str(run_dir),
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flat_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics for the TensorBoard HPARAMS view: scalars, interval bounds (`_low`, `_high`) and the
    per-group recalls (`test_shot_group_recall/many`...)."""
    flat = {}
    for key, value in metrics.items():
        if _is_number(value):
            flat[key] = value
        elif key.endswith("_ci") and isinstance(value, list):
            flat[f"{key}_low"], flat[f"{key}_high"] = value
        elif key == "test_shot_group_recall":
            flat.update({f"{key}/{group}": v for group, v in value.items()})
    return flat


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
