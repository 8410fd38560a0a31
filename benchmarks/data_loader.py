"""Data: loader images/s (decode + augment) against what the training step consumes, for the default jobs.

For each job (jobs/<job>.yaml, data.root from --data) on this machine:
  decode  cold: every photo's JPEG decode with the pipeline's thread pool (`load_images` without a cache), and the
          median single-thread `decode_image` ms per photo; the files are in the OS page cache (the scan hashed them).
          warm: reading the on-disk cache of decoded images (data.cache_dir) that a first call wrote.
          Training decodes once, in setup; no epoch decodes a JPEG.
  loader  the real training DataLoader (random crop, flip, jitter over the decoded images, as every epoch runs it)
          with num_workers 0, 1, 2: images/s from the 2nd batch on; the wait for the 1st batch (worker start-up)
          is shown apart. Measured alone: in training, workers share the cores with the step.
  step    the job's model and loss (as DogClassifier builds them): forward + backward + gradient clipping + AdamW step
          on random batches of the job's batch and image size, at the job's precision, median over --batches steps.
The loader should deliver >= 3x what the step consumes: with num_workers=0 the two run one after the other.

    .venv/bin/python benchmarks/data_loader.py [--data ../shared/white-dogs] [--jobs gmlp,basic-mlp]
        [--batches 100] [--workers 0,1,2] [--threads N] [--device auto] [--quick]

Prints markdown tables; a measurement, not a test (tests/test_benchmarks.py only checks that it runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from machine import machine_info  # benchmarks/machine.py, beside this script

from dogclf.config import ConfigError, JobConfig, load_job
from dogclf.data import DataError, WhiteDogsDataModule
from dogclf.data.cache import decode_image, load_images
from dogclf.data.index import scan
from dogclf.data.split import limit_per_class
from dogclf.data.transforms import resize_size
from dogclf.module import DogClassifier, build_adamw
from dogclf.train import resolve_precision

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 3.0
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # other precisions run as float32 here
QUICK = [("data.max_per_class", 12), ("data.image_size", 32)]
QUICK_BATCHES = 4
WARMUP_STEPS = 3


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_costs(cfg: JobConfig, cache_dir: Path) -> dict[str, float]:
    """Cold (JPEG) and warm (cache file) decode rates of the job's photos; writes the cache into `cache_dir`."""
    _, samples, _ = scan(Path(cfg.data.root))
    files = {s.sha1: s.path for s in limit_per_class(samples, cfg.data.max_per_class)}
    side = resize_size(cfg.data.image_size)
    pool_s = seconds(lambda: load_images(files, side, None))
    single_ms = statistics.median(seconds(lambda p=p: decode_image(p, side)) for p in files.values()) * 1e3
    load_images(files, side, cache_dir)  # decodes and writes the cache file
    warm_s = seconds(lambda: load_images(files, side, cache_dir))
    cache_mb = sum(p.stat().st_size for p in cache_dir.glob(f"images-{side}px-*.pt")) / 2**20
    n = len(files)
    return {"images": n, "side": side, "pool_ips": n / pool_s, "pool_ms": pool_s / n * 1e3, "single_ms": single_ms,
            "warm_ips": n / warm_s, "cache_mb": cache_mb}


def loader_rate(data: WhiteDogsDataModule, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over batches 2..N) of the training loader, epoch after epoch."""
    loader = data.train_dataloader()
    start = time.perf_counter()
    first = images = count = 0
    while count < batches:
        for _, labels in loader:
            count += 1
            if count == 1:
                first = time.perf_counter()
            else:
                images += len(labels)
            if count == batches:
                break
    return first - start, images / (time.perf_counter() - first)


def step_rate(cfg: JobConfig, data: WhiteDogsDataModule, steps: int, device: torch.device, precision: str) -> float:
    """Training images/s of the job's model: forward, backward, clipping and AdamW step, median step time."""
    spec = cfg.to_dict()
    module = DogClassifier(model_cfg=spec["model"], optim_cfg=spec["optim"], classes=data.classes,
                           class_counts=data.train_class_counts, image_size=cfg.data.image_size).to(device).train()
    model, optim = module.model, cfg.optim
    optimizer = build_adamw(model, spec["optim"], precision=precision)  # the optimiser training uses
    size, batch = cfg.data.image_size, cfg.data.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(len(data.classes), (batch,), device=device)
    dtype = AUTOCAST.get(precision)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = module.criterion(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(WARMUP_STEPS):
        step()
    return batch / statistics.median(seconds(step) for _ in range(steps))


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    print(f"# Data loader vs training step\n\n{machine_info(device)}\n")
    loader_rows, decode_rows = [], {}
    with tempfile.TemporaryDirectory(prefix="dogclf-bench-cache-") as cache_dir:
        for job in args.jobs:
            cfg = load_job(job, [*(QUICK if args.quick else []), ("data.root", str(args.data)),
                                 ("data.cache_dir", cache_dir)])
            key = (cfg.data.max_per_class, cfg.data.image_size)
            if key not in decode_rows:
                decode_rows[key] = {"jobs": [], **decode_costs(cfg, Path(cache_dir))}
            decode_rows[key]["jobs"].append(job)
            precision = resolve_precision(cfg.trainer.precision, device.type)
            step_ips = None
            for workers in args.workers:
                data = WhiteDogsDataModule(dataclasses.replace(cfg.data, num_workers=workers), seed=cfg.trainer.seed)
                data.setup()  # reads the cache written above
                if step_ips is None:
                    step_ips = step_rate(cfg, data, args.batches, device, precision)
                startup, ips = loader_rate(data, args.batches)
                ratio = ips / step_ips
                loader_rows.append(
                    f"| {job} ({cfg.model.preset}, {cfg.data.image_size} px, batch {cfg.data.batch_size}, "
                    f"{precision}) | {workers} | {startup:.3f} | {ips:.0f} | {step_ips:.0f} | {ratio:.1f} | "
                    f"{'pass' if ratio >= TARGET_RATIO else 'FAIL'} |"
                )
    print(f"Loader: training DataLoader over images decoded in setup, {args.batches} batches, images/s from the 2nd "
          f"batch on. Step: forward + backward + AdamW on {device.type}, median of {args.batches} steps. "
          f"Target: loader >= {TARGET_RATIO:g}x step.\n")
    print("| job | workers | 1st batch s | loader img/s | step img/s | loader/step | >= 3x |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(loader_rows))
    print(f"\nDecode: cold = JPEG decode ({os.cpu_count()}-thread pool of load_images; 1 thread: median per photo), "
          "warm = reading the decoded-image cache file. Once per run, in setup.\n")
    print("| jobs | photos | short side px | cold img/s | cold ms/img | 1-thread ms/img | warm img/s | cache MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in decode_rows.values():
        print(f"| {', '.join(row['jobs'])} | {row['images']} | {row['side']} | {row['pool_ips']:.0f} | "
              f"{row['pool_ms']:.2f} | {row['single_ms']:.2f} | {row['warm_ips']:.0f} | {row['cache_mb']:.1f} |")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"worker counts must be 0 or more, got {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--data", type=Path, default=Path("../shared/white-dogs"),
                        help="photo folder, one sub-folder per class; a relative path is taken from the repository "
                             "root (default: %(default)s)")
    parser.add_argument("--jobs", type=lambda s: s.split(","), default=["gmlp", "basic-mlp"],
                        help="comma-separated job names or YAML paths (default: gmlp,basic-mlp)")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"loader batches and timed steps per measurement, at least 2 (default: 100; "
                             f"--quick: {QUICK_BATCHES})")
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2],
                        help="DataLoader num_workers values to measure (default: 0,1,2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the step (default: torch's, as training uses)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the step runs; auto: CUDA when available, as trainer.accelerator=auto "
                             "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 12 photos per class, 32 px, {QUICK_BATCHES} batches")
    args = parser.parse_args()
    args.batches = args.batches or (QUICK_BATCHES if args.quick else 100)
    if args.batches < 2:
        parser.error("--batches must be at least 2: the first batch is not timed")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.data = (REPO_ROOT / args.data).resolve()  # an absolute --data stays as given
    try:
        run(args)
    except (ConfigError, DataError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
