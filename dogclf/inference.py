"""Use a trained model: load a training checkpoint, evaluate it on any folder-per-class directory (or one split of
its own run), predict breeds of single images, and export it with its preprocessing and class names.

Everything here computes what training's evaluation computes: the EMA weights when the run had EMA (the module's
eval-mode forward), logits minus the module's `logit_offset`, images decoded like the data pipeline
(`decode_image`: upright RGB, shorter side resized to `resize_size(image_size)`) and `build_eval_transform`.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import math
import pickle
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dogclf.config import ConfigError
from dogclf.data.cache import load_images
from dogclf.data.index import IMAGE_EXTENSIONS, DataError, image_files
from dogclf.data.split import SPLITS
from dogclf.data.transforms import CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, resize_size
from dogclf.metrics import bootstrap_intervals, classification_metrics, confusion_matrix_figure, wilson_interval
from dogclf.module import DogClassifier

HPARAM_KEYS = ("model_cfg", "optim_cfg", "classes", "class_counts", "image_size")
DECODE_CHUNK = 256  # images decoded (in threads) and held at once: memory stays bounded on large folders
EXPORT_FORMATS = ("torchscript", "onnx")
METADATA_FILE = "dogclf.json"  # TorchScript extra file / ONNX metadata key holding classes and preprocessing


# ---------------------------------------------------------------------------------------------------- loading


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> DogClassifier:
    """The `DogClassifier` of a training checkpoint (`checkpoints/last.ckpt`, `best-*.ckpt`), in eval mode.

    The file is read with `torch.load(weights_only=True)`: a checkpoint is data and never runs pickled code.
    Raises ConfigError with the fix when the file is missing or is not a dogclf training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass a run's checkpoints/last.ckpt or best-epochNNN.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a random file fails the unpickler in many ways: KeyError, ...)
        raise ConfigError(f"{path} is not a dogclf checkpoint: torch.load(weights_only=True) cannot read it "
                          f"({_load_error(err)})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ConfigError(f"{path} is not a dogclf checkpoint: it has no Lightning state_dict and hyper_parameters; "
                          "pass a checkpoint written by `dogclf train` (checkpoints/last.ckpt or best-*.ckpt)")
    missing = [key for key in HPARAM_KEYS if key not in hparams]
    if missing:
        raise ConfigError(f"{path} is not a dogclf checkpoint: its hyper_parameters lack {', '.join(missing)}")
    try:
        module = DogClassifier(**{key: hparams[key] for key in HPARAM_KEYS})
        module.load_state_dict(checkpoint["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{path} does not fit this version of dogclf's model: {str(err).splitlines()[0]}") from None
    module.on_load_checkpoint(checkpoint)
    return module.to(device).eval()


def _load_error(err: Exception) -> str:
    """The useful part of a torch.load error (the weights-only unpickler wraps it in paragraphs of advice)."""
    if isinstance(err, EOFError):
        return "the file is empty or truncated"
    if not isinstance(err, (pickle.UnpicklingError, RuntimeError, ValueError, OSError)):
        return f"not a file torch.save wrote: {type(err).__name__} while unpickling"
    text = str(err).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\.?\n|\.?$)", text)
    if found:
        return found.group(1).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name}: not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def image_size_of(module: DogClassifier) -> int:
    return int(module.hparams.image_size)


# ---------------------------------------------------------------------------------------------------- forward


def decoded(paths: Sequence[Path], image_size: int) -> Iterator[tuple[int, torch.Tensor | str]]:
    """(index into `paths`, uint8 CHW image or the reason it failed), decoded like the data pipeline, in chunks."""
    short_side = resize_size(image_size)
    for start in range(0, len(paths), DECODE_CHUNK):
        chunk = {str(i): paths[i] for i in range(start, min(start + DECODE_CHUNK, len(paths)))}
        images, failures = load_images(chunk, short_side, cache_dir=None)
        for key in chunk:
            yield int(key), images[key] if key in images else failures[key]


def batched_logits(module: DogClassifier, images: Iterable[torch.Tensor], batch_size: int) -> torch.Tensor:
    """(N, C) float32 logits on the CPU of uint8 CHW images, exactly as training evaluates: eval transform, the
    module's eval forward (EMA weights when on), minus `logit_offset`."""
    transform = build_eval_transform(image_size_of(module))
    device = module.logit_offset.device
    out, batch = [], []

    def flush() -> None:
        with torch.inference_mode():
            raw = module(torch.stack(batch).to(device)).float()
            out.append((raw - module.logit_offset).cpu())
        batch.clear()

    for image in images:
        batch.append(transform(image))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return torch.cat(out) if out else torch.zeros(0, len(module.classes))


def logits_of_files(
    module: DogClassifier, paths: Sequence[Path], batch_size: int
) -> tuple[list[int], torch.Tensor, dict[int, str]]:
    """Indices of the decodable `paths`, their logits (same order), and index -> reason for the others."""
    failures: dict[int, str] = {}
    kept: list[int] = []

    def images() -> Iterator[torch.Tensor]:
        for index, item in decoded(paths, image_size_of(module)):
            if isinstance(item, str):
                failures[index] = item
            else:
                kept.append(index)
                yield item

    logits = batched_logits(module, images(), batch_size)
    return kept, logits, failures


# ---------------------------------------------------------------------------------------------------- evaluate


@dataclass(frozen=True)
class Item:
    path: Path
    folder_class: str  # the class name on disk (folder or split.csv)
    sha1: str | None = None  # recorded in split.csv


def folder_items(root: Path) -> list[Item]:
    """Every image in the class folders under `root` (hidden folders and top-level files ignored)."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"data folder {root} {what}: pass --data DIR, a folder with one sub-folder per class")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items = [Item(path, folder.name) for folder in folders for path in image_files(folder)]
    if not items:
        raise DataError(f"data folder {root} has no class sub-folders with images: one sub-folder of images per class")
    return items


def split_items(csv_path: Path, root: Path, split: str) -> list[Item]:
    """The images of one split recorded in a run's split.csv (paths relative to the data root `root`)."""
    if not csv_path.is_file():
        raise ConfigError(f"split file {csv_path} does not exist: pass --split-csv RUN_DIR/split.csv")
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist: pass --data DIR, the data root the run trained on")
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "class", "split"} <= set(reader.fieldnames or ()):
            raise ConfigError(f"{csv_path} is not a split.csv: expected the columns path,class,split,sha1")
        items = [Item(root / row["path"], row["class"], row.get("sha1") or None) for row in reader
                 if row["split"] == split]
    if not items:
        raise DataError(f"{csv_path} lists no images in split {split!r}")
    if not any(item.path.is_file() for item in items):
        raise DataError(f"none of the {len(items)} {split} images of {csv_path} is under {root}: pass --data DIR, "
                        "the data root the run trained on")
    return items


def default_eval_dir(checkpoint: Path) -> Path:
    """`<run>/eval` for `<run>/checkpoints/X.ckpt`, else `eval/` beside the checkpoint."""
    parent = checkpoint.resolve().parent
    return (parent.parent if parent.name == "checkpoints" else parent) / "eval"


def evaluate(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split_csv: str | Path | None = None,
    split: str | None = None,
    out: str | Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on the class folders of `data`, or on one `split` of a run's `split_csv`.

    Folder classes are matched to the model's classes by name. Images of a folder the model does not know are
    predicted but kept out of the metrics and reported under `unknown_classes`; a model class without images has
    support 0 (recall NaN, left out of balanced accuracy). Writes the confusion-matrix PNG and the result JSON into
    `out` (default `<run>/eval/`) and returns the result.
    """
    checkpoint, root = Path(checkpoint), Path(data).expanduser().resolve()
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if split is not None and split_csv is None:
        split_csv = default_eval_dir(checkpoint).parent / "split.csv"
    if split_csv is not None:
        split = split or "test"
    module = load_classifier(checkpoint, resolve_device(device))
    items = split_items(Path(split_csv), root, split) if split_csv is not None else folder_items(root)
    classes = module.classes
    known = [item.folder_class for item in items if item.folder_class in classes]
    if not known:
        found = sorted({item.folder_class for item in items})
        raise DataError(f"none of the classes in {root} ({', '.join(found)}) is a class of the model "
                        f"({', '.join(classes)}): use `dogclf predict` for photos of other breeds")

    kept, logits, failures = logits_of_files(module, [item.path for item in items], batch_size)
    items_kept = [items[i] for i in kept]
    predicted = logits.argmax(dim=1)
    is_known = torch.tensor([item.folder_class in classes for item in items_kept], dtype=torch.bool)
    labels = torch.tensor([classes.index(item.folder_class) for item in items_kept if item.folder_class in classes],
                          dtype=torch.long)
    n = len(classes)
    confusion = torch.bincount(labels * n + predicted[is_known], minlength=n * n).reshape(n, n)
    metrics = classification_metrics(confusion, classes)
    intervals = bootstrap_intervals(confusion, seed=seed)
    hits = confusion.diag().tolist()
    loss = F.cross_entropy(logits[is_known], labels).item() if len(labels) else math.nan

    unknown: dict[str, dict[str, Any]] = {}
    for item, pred in zip(items_kept, predicted.tolist()):
        if item.folder_class not in classes:
            entry = unknown.setdefault(item.folder_class, {"images": 0, "predicted": dict.fromkeys(classes, 0)})
            entry["images"] += 1
            entry["predicted"][classes[pred]] += 1
    changed = [str(items[i].path) for i in kept if items[i].sha1 and _sha1(items[i].path) != items[i].sha1]

    out_dir = Path(out) if out is not None else default_eval_dir(checkpoint)
    tag = f"{checkpoint.stem}-{split}" if split_csv is not None else f"{checkpoint.stem}-{root.name}"
    result = {
        "checkpoint": str(checkpoint),
        "data": str(root),
        "split_csv": str(split_csv) if split_csv is not None else None,
        "split": split if split_csv is not None else None,
        "classes": classes,
        "images": len(labels),
        "loss": loss,
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"],
        **{f"{key}_ci": list(interval) for key, interval in intervals.items()},
        "per_class_recall": metrics["per_class_recall"],
        "per_class_recall_ci": {
            name: list(wilson_interval(int(hits[i]), metrics["per_class_support"][name]))
            for i, name in enumerate(classes)
        },
        "per_class_precision": metrics["per_class_precision"],
        "per_class_support": metrics["per_class_support"],
        "confusion_matrix": confusion.tolist(),
        "unknown_classes": unknown,
        "unreadable": [{"path": str(items[i].path), "error": reason} for i, reason in sorted(failures.items())],
        "changed_since_split": changed,
        "confusion_png": str(out_dir / f"{tag}-confusion.png"),
        "json": str(out_dir / f"{tag}.json"),
    }
    _write_outputs(result, confusion, out_dir)
    return result


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _write_outputs(result: dict[str, Any], confusion: torch.Tensor, out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        title = f"{Path(result['checkpoint']).name} on {result['split'] or Path(result['data']).name}" \
                f"  balanced acc {result['balanced_accuracy']:.3f}"
        figure = confusion_matrix_figure(confusion, result["classes"], title)
        figure.savefig(result["confusion_png"])
        import matplotlib.pyplot as plt

        plt.close(figure)
        Path(result["json"]).write_text(to_json(result, indent=2) + "\n")
    except OSError as err:
        raise ConfigError(f"cannot write the evaluation into {out_dir} ({err.strerror or err}): pass --out DIR "
                          "on writable storage") from None


def to_json(data: Any, **kwargs: Any) -> str:
    """Strict JSON: NaN (recall of a class with no images, an undefined interval) becomes null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), allow_nan=False, **kwargs)


def format_evaluation(result: dict[str, Any]) -> str:
    """The evaluation as text: headline metrics, per-class table, unknown classes, skipped files, outputs."""
    where = f"split {result['split']} of {result['split_csv']}" if result["split"] else result["data"]
    acc_low, acc_high = result["accuracy_ci"]
    low, high = result["balanced_accuracy_ci"]
    f1_low, f1_high = result["macro_f1_ci"]
    lines = [
        f"{result['checkpoint']} on {where}: {result['images']} images",
        f"accuracy           {result['accuracy']:.3f}  95% bootstrap CI [{acc_low:.3f}, {acc_high:.3f}]",
        f"balanced accuracy  {result['balanced_accuracy']:.3f}  95% bootstrap CI [{low:.3f}, {high:.3f}]",
        f"macro-F1           {result['macro_f1']:.3f}  95% bootstrap CI [{f1_low:.3f}, {f1_high:.3f}]",
        f"loss               {result['loss']:.4f}",
        "",
        f"{'class':<16} {'recall':>6}  {'95% Wilson CI':<14} {'precision':>9} {'support':>7}",
    ]
    for name in result["classes"]:
        support = result["per_class_support"][name]
        if support:
            r_low, r_high = result["per_class_recall_ci"][name]
            recall, interval = f"{result['per_class_recall'][name]:.3f}", f"[{r_low:.2f}, {r_high:.2f}]"
        else:
            recall, interval = "-", "(no images)"
        lines.append(f"{name:<16} {recall:>6}  {interval:<14} {result['per_class_precision'][name]:>9.3f} "
                     f"{support:>7}")
    for name, entry in result["unknown_classes"].items():
        counts = ", ".join(f"{c} {k}" for c, k in entry["predicted"].items() if k)
        lines.append(f"unknown class {name!r} (not a class of the model, not in the metrics): {entry['images']} "
                     f"images, predicted as {counts}")
    if result["unreadable"]:
        lines.append(f"skipped {len(result['unreadable'])} unreadable image file(s):")
        lines += [f"  {entry['path']}: {entry['error']}" for entry in result["unreadable"]]
    if result["changed_since_split"]:
        lines.append(f"warning: {len(result['changed_since_split'])} file(s) changed since split.csv was written "
                     f"(SHA-1 differs), e.g. {result['changed_since_split'][0]}")
    lines += ["", f"confusion matrix: {result['confusion_png']}", f"results: {result['json']}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- predict


def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Image files among `paths` (folders searched recursively, hidden entries skipped), and missing paths."""
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files += sorted(
                p for p in entry.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(entry).parts)
            )
        elif entry.is_file():
            files.append(entry)
        else:
            missing.append((entry, "no such file or folder"))
    return files, missing


def predict(
    checkpoint: str | Path, paths: Sequence[str | Path], *, top_k: int = 3, batch_size: int = 64, device: str = "auto"
) -> dict[str, Any]:
    """Top-k classes with probabilities for every image in `paths`; unreadable files are listed, not fatal."""
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be 1 or more")
    module = load_classifier(checkpoint, resolve_device(device))
    files, missing = find_images(paths)
    kept, logits, failures = logits_of_files(module, files, batch_size)
    probabilities = logits.softmax(dim=1)
    k = min(top_k, len(module.classes))
    values, indices = probabilities.topk(k, dim=1)
    predictions = [
        {
            "path": str(files[i]),
            "top": [{"class": module.classes[c], "probability": p} for c, p in zip(idx.tolist(), val.tolist())],
        }
        for i, idx, val in zip(kept, indices, values)
    ]
    unreadable = [{"path": str(p), "error": why} for p, why in missing]
    unreadable += [{"path": str(files[i]), "error": why} for i, why in sorted(failures.items())]
    if not predictions and not unreadable:
        raise DataError(f"no image files in {', '.join(map(str, paths))} (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return {"checkpoint": str(checkpoint), "classes": module.classes, "predictions": predictions,
            "unreadable": unreadable}


def format_predictions(result: dict[str, Any], fmt: str) -> str:
    """`table` (aligned text), `json` (one object) or `csv` (path,rank,class,probability,error; one row per rank,
    one row with the error for an unreadable file)."""
    if fmt == "json":
        return to_json(result)
    if fmt == "csv":
        import io

        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for entry in result["predictions"]:
            for rank, top in enumerate(entry["top"], start=1):
                writer.writerow([entry["path"], rank, top["class"], f"{top['probability']:.6f}", ""])
        for entry in result["unreadable"]:
            writer.writerow([entry["path"], "", "", "", entry["error"]])
        return buffer.getvalue().rstrip("\n")
    if fmt != "table":
        raise ConfigError(f"--format {fmt}: choose table, json or csv")
    k = max((len(entry["top"]) for entry in result["predictions"]), default=0)
    width = max((len(entry["path"]) for entry in result["predictions"]), default=4)
    lines = ["  ".join([f"{'path':<{width}}", *(f"{f'top-{r}':<22}" for r in range(1, k + 1))]).rstrip()]
    for entry in result["predictions"]:
        cells = [f"{top['class'] + ' ' + format(top['probability'], '.3f'):<22}" for top in entry["top"]]
        lines.append("  ".join([f"{entry['path']:<{width}}", *cells]).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- export


class ExportedClassifier(nn.Module):
    """The network with its preprocessing constants and class names.

    Input: float32 RGB images (B, 3, S, S) in [0, 1], S = `image_size`, prepared like training's evaluation:
    shorter side resized (bicubic, antialiased) to `resize_size` = ceil(S / 0.875), center crop S x S, divided by
    255. Output: (B, C) logits in the order of `classes` (the post-hoc `logit_offset` already subtracted);
    softmax gives probabilities.
    """

    def __init__(self, network: nn.Module, *, classes: Sequence[str], image_size: int, logit_offset: torch.Tensor):
        super().__init__()
        self.network = network
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.resize_size = resize_size(image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("logit_offset", logit_offset.detach().float().clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((images - self.mean) / self.std) - self.logit_offset


def exported_classifier(module: DogClassifier) -> ExportedClassifier:
    """An eager CPU copy of what evaluation runs: the EMA network when the module has EMA, else the model."""
    network = module.ema.module if module.ema is not None else module.model
    network = copy.deepcopy(network).cpu().eval().requires_grad_(False)
    return ExportedClassifier(network, classes=module.classes, image_size=image_size_of(module),
                              logit_offset=module.logit_offset.cpu()).eval()


def export_metadata(module: DogClassifier, fmt: str, checkpoint: Path) -> dict[str, Any]:
    size = image_size_of(module)
    return {
        "format": fmt,
        "classes": module.classes,
        "image_size": size,
        "resize_size": resize_size(size),
        "crop_ratio": CROP_RATIO,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": f"float32 RGB (batch, 3, {size}, {size}) in [0, 1]: shorter side resized (bicubic, antialiased) to "
                 f"{resize_size(size)}, center crop {size}, divided by 255; normalisation is inside the model",
        "output": "logits (batch, classes), post-hoc logit offset applied; softmax for probabilities",
        "architecture": module.hparams.model_cfg["preset"],
        "ema": module.ema is not None,
        "checkpoint": str(checkpoint),
    }


def export(checkpoint: str | Path, fmt: str, out: str | Path) -> dict[str, Any]:
    """Write the checkpoint's evaluation model as TorchScript (`.pt`, class names and preprocessing in the
    `dogclf.json` extra file and as module attributes) or ONNX (the same JSON in the metadata property `dogclf`).
    Checks the written file against the checkpoint on a random batch and returns where, and the largest logit
    difference."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        _require("onnx", "--format onnx")
    checkpoint, out = Path(checkpoint), Path(out)
    module = load_classifier(checkpoint, "cpu")
    wrapper = exported_classifier(module)
    meta = export_metadata(module, fmt, checkpoint)
    size = meta["image_size"]
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    check = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # another batch size
    with torch.no_grad():
        expected = wrapper(check)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "torchscript":
            scripted = _torchscript(wrapper, example)
            scripted.save(str(out), _extra_files={METADATA_FILE: json.dumps(meta)})
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
                got = torch.jit.load(str(out), map_location="cpu")(check)
            verified = "torch.jit.load"
        else:
            got, verified = _onnx(wrapper, example, check, out, meta)
    except OSError as err:
        raise ConfigError(f"cannot write {out} ({err.strerror or err}): pass --out FILE on writable storage") from None
    result = {"path": str(out), "format": fmt, "classes": module.classes, "image_size": size, "verified_with": verified}
    result["max_abs_diff"] = (got - expected).abs().max().item() if got is not None else None
    return result


def _torchscript(wrapper: ExportedClassifier, example: torch.Tensor) -> torch.jit.ScriptModule:
    """Trace the network (shape checks become constants; the batch size stays free), script the wrapper so that
    `classes`, `image_size` and `resize_size` stay attributes of the loaded module."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)  # chosen knowingly
        traced = torch.jit.trace(wrapper.network, ((example - wrapper.mean) / wrapper.std,))
        scriptable = ExportedClassifier(traced, classes=wrapper.classes, image_size=wrapper.image_size,
                                        logit_offset=wrapper.logit_offset)
        return torch.jit.script(scriptable.eval())


def _onnx(wrapper: ExportedClassifier, example: torch.Tensor, check: torch.Tensor, out: Path,
          meta: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
    import onnx

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (example,), str(out), dynamo=False, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    model = onnx.load(str(out))
    entry = model.metadata_props.add()
    entry.key, entry.value = "dogclf", json.dumps(meta)
    onnx.save(model, str(out))
    try:
        import onnxruntime
    except ImportError:
        return None, "not verified (onnxruntime is not installed)"
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": check.numpy()})[0]), "onnxruntime"


def _require(package: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{what} needs the {package} package, which is not installed: pip install {package} "
                          "(or pip install 'dogclf[export]')")


def read_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The `dogclf.json` metadata of an exported TorchScript file."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])
