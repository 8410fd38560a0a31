"""Typed job configuration: `jobs/<mode>.yaml` is the single source of every default.

The dataclasses below declare names and types only (no default values): a job spec must set every
field, so there is exactly one place where a default lives. `--set dotted.key=value` overrides any
field after loading; unknown keys and wrong types are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = ("shuffle", "sqrt", "balanced")
LOSSES = ("ce", "focal", "logit_adjusted", "balanced_softmax", "ldam")
WEIGHTINGS = ("none", "inverse", "inverse_sqrt", "effective_number")


class ConfigError(ValueError):
    """A job spec or override the user must fix; the message says what and how."""


class StorageError(Exception):
    """The run directory stopped taking writes during a run (disk full, directory removed); says what to do."""


@dataclass
class ModelConfig:
    preset: str  # a name from `dogclf.models.list_models()`
    drop_path_rate: float | None  # None: the preset's own value
    attn_dim: int | None  # gMLP only: size of the tiny attention of aMLP; None: plain gMLP
    hidden_sizes: list[int] | None  # basic MLP only; None: the preset's
    dropout: float | None  # basic MLP only; None: the preset's
    init_from: str | None  # a timm gMLP state dict or a dogclf checkpoint to start from


@dataclass
class DataConfig:
    root: str  # one sub-folder per class; relative paths are taken from the working directory
    image_size: int  # model input side in pixels
    val_fraction: float
    test_fraction: float
    max_per_class: int | None  # keep at most N images of each class (quick runs, tests)
    batch_size: int
    sampler: str  # shuffle | sqrt | balanced: draw training images uniformly, or with 1/sqrt(n_c) or 1/n_c weights
    num_workers: int
    cache_dir: str | None  # where the decoded uint8 cache is kept on disk; None: memory only
    crop_scale_min: float  # RandomResizedCrop lower scale bound
    color_jitter: float  # brightness/contrast strength; saturation and hue are scaled down from it


@dataclass
class OptimConfig:
    lr: float  # peak AdamW learning rate
    weight_decay: float
    betas: list[float]
    warmup_epochs: float
    min_lr_ratio: float  # cosine floor as a fraction of lr
    label_smoothing: float
    loss: str  # ce | focal | logit_adjusted | balanced_softmax | ldam (dogclf/losses.py)
    class_weighting: str  # none | inverse | inverse_sqrt | effective_number: loss weights from training counts
    cb_beta: float  # beta of the effective number of samples (class_weighting=effective_number, DRW)
    focal_gamma: float  # loss=focal
    logit_tau: float  # loss=logit_adjusted: logits + tau * log(prior) in training
    ldam_max_margin: float  # loss=ldam: margin of the rarest class
    ldam_scale: float  # loss=ldam: logit scale s
    drw_epoch: int | None  # deferred re-weighting: effective-number weights from this epoch on; None: off
    posthoc_adjust: bool  # test with logits - tau * log(prior), tau tuned for balanced accuracy on validation
    grad_clip: float | None  # max gradient norm; None: off
    ema_decay: float | None  # EMA of weights used for evaluation; None: off


@dataclass
class TrainerConfig:
    max_epochs: int
    precision: str  # auto | bf16-mixed | 16-mixed | 32-true | ...
    accelerator: str  # auto | cpu | gpu
    devices: int
    seed: int
    log_every_n_steps: int
    threads: int | None  # torch intra-op threads; None: all cores


@dataclass
class JobConfig:
    name: str  # run directory is <output>/<name>
    output: str
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (for TensorBoard hparams and tables)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation` where that is lossless, else raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list like [1, 2], got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and type(value) is annotation:
        return value
    raise ConfigError(f"{key}: expected {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'job spec'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}: valid keys here are {', '.join(names)}")
    missing = [n for n in names if n not in data]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing key {where}{missing[0]}: every field must be set in the job spec")
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name], key)
        else:
            kwargs[name] = _check_type(key, data[name], hint)
    return cls(**kwargs)


def _validate(cfg: JobConfig) -> None:
    checks = [
        ("data.image_size", cfg.data.image_size > 0, "a positive number of pixels"),
        ("data.batch_size", cfg.data.batch_size > 0, "a positive integer"),
        ("data.num_workers", cfg.data.num_workers >= 0, "0 or more"),
        ("data.sampler", cfg.data.sampler in SAMPLERS, f"one of {', '.join(SAMPLERS)}"),
        ("data.val_fraction", 0 < cfg.data.val_fraction < 1, "between 0 and 1"),
        ("data.test_fraction", 0 < cfg.data.test_fraction < 1, "between 0 and 1"),
        (
            "data.val_fraction + data.test_fraction",
            cfg.data.val_fraction + cfg.data.test_fraction < 1,
            "below 1 so that training keeps images",
        ),
        ("data.max_per_class", cfg.data.max_per_class is None or cfg.data.max_per_class >= 3, "null or at least 3"),
        ("data.crop_scale_min", 0 < cfg.data.crop_scale_min <= 1, "in (0, 1]"),
        ("data.color_jitter", cfg.data.color_jitter >= 0, "0 or more"),
        ("optim.lr", cfg.optim.lr > 0, "a positive number such as 1e-3"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "0 or more"),
        ("optim.betas", len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "two numbers in [0, 1)"),
        ("optim.warmup_epochs", cfg.optim.warmup_epochs >= 0, "0 or more"),
        ("optim.min_lr_ratio", 0 <= cfg.optim.min_lr_ratio <= 1, "in [0, 1]"),
        ("optim.label_smoothing", 0 <= cfg.optim.label_smoothing < 1, "in [0, 1)"),
        ("optim.loss", cfg.optim.loss in LOSSES, f"one of {', '.join(LOSSES)}"),
        ("optim.class_weighting", cfg.optim.class_weighting in WEIGHTINGS, f"one of {', '.join(WEIGHTINGS)}"),
        ("optim.cb_beta", 0 <= cfg.optim.cb_beta < 1, "in [0, 1), e.g. 0.999"),
        ("optim.focal_gamma", cfg.optim.focal_gamma >= 0, "0 or more"),
        ("optim.logit_tau", cfg.optim.logit_tau >= 0, "0 or more"),
        ("optim.ldam_max_margin", cfg.optim.ldam_max_margin >= 0, "0 or more"),
        ("optim.ldam_scale", cfg.optim.ldam_scale > 0, "positive"),
        ("optim.drw_epoch", cfg.optim.drw_epoch is None or cfg.optim.drw_epoch >= 0, "null or an epoch (0 or more)"),
        (
            "optim.label_smoothing",
            cfg.optim.loss != "focal" or cfg.optim.label_smoothing == 0,
            "0 with optim.loss=focal (focal loss does not combine with label smoothing)",
        ),
        ("optim.grad_clip", cfg.optim.grad_clip is None or cfg.optim.grad_clip > 0, "null or positive"),
        ("optim.ema_decay", cfg.optim.ema_decay is None or 0 < cfg.optim.ema_decay < 1, "null or in (0, 1)"),
        ("trainer.max_epochs", cfg.trainer.max_epochs > 0, "a positive integer"),
        ("trainer.devices", cfg.trainer.devices > 0, "a positive integer"),
        ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps > 0, "a positive integer"),
        ("trainer.threads", cfg.trainer.threads is None or cfg.trainer.threads > 0, "null or a positive integer"),
        ("name", bool(cfg.name) and "/" not in cfg.name, "a non-empty name without '/'"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}: fix it in the job spec or with --set {key.split(' ')[0]}=...")


def writable_dir(path: Path, fix: str = "pass --output DIR on writable storage") -> Path:
    """Create `path` (with parents) and check that files can be written in it; else a ConfigError saying `fix`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"output directory {path} cannot be written ({err.strerror}): {fix}") from None
    return path


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r} has no '=': write it as --set key=value, e.g. --set optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r} has an empty key: write it as --set key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section of the job spec")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"--set {key}: unknown key; valid keys here are {', '.join(node)}")
        node[parts[-1]] = value
    return data


def job_path(mode: str) -> Path:
    """`gmlp` -> jobs/gmlp.yaml, looked up in ./jobs then in the checkout that holds this package."""
    candidate = Path(mode)
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.is_file():
            return candidate
        raise ConfigError(f"job spec {candidate} does not exist: pass an existing YAML file")
    for folder in (Path.cwd() / "jobs", REPO_ROOT / "jobs"):
        if (folder / f"{mode}.yaml").is_file():
            return folder / f"{mode}.yaml"
    known = sorted(p.stem for p in (REPO_ROOT / "jobs").glob("*.yaml"))
    raise ConfigError(f"no job spec for mode {mode!r}: choose one of {', '.join(known)} or pass a .yaml path")


def load_job(mode: str, overrides: list[str | tuple[str, Any]] | None = None) -> JobConfig:
    """Load `jobs/<mode>.yaml` (or a YAML path), apply overrides (`"key=value"` strings or `(key, value)` pairs),
    check types and ranges."""
    path = job_path(mode)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    pairs = [o if isinstance(o, tuple) else parse_override(o) for o in overrides or []]
    return config_from_dict(data, pairs)


def config_from_dict(data: dict[str, Any], overrides: list[tuple[str, Any]] | None = None) -> JobConfig:
    data = apply_overrides(data, overrides or [])
    cfg = _build(JobConfig, data, "")
    _validate(cfg)
    return cfg


def save_config(cfg: JobConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config_file(path: Path) -> JobConfig:
    """Load a resolved `config.yaml` written into a run directory."""
    return config_from_dict(yaml.safe_load(Path(path).read_text()))
