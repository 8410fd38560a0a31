"""Training-step speed of dogclf's models against timm's gMLP doing the same math, their MFU against a matmul
ceiling measured in the same run, and torch.compile on/off.

    python benchmarks/model_step.py                        # CPU: the default job's model, gMLP-Ti at 112/224 px, MLP
    python benchmarks/model_step.py --device cuda --models gmlp-ti@224,gmlp-s@224 --precisions bf16 --compile

One step = forward, cross-entropy, backward and an AdamW update (fused where PyTorch has it, as in training) on a
fixed random batch, stochastic depth off in both models. Our model and timm's are built with the same
configuration (timm's `MlpMixer` with `SpatialGatingBlock`/`GatedMlp`, i.e. `gmlp_ti16_224`/`gmlp_s16_224` at the
paper's sizes), stepped alternately in the same process (the order flips every round), and each figure is the
median over the timed steps after warm-up; "ours/timm" is the median of the per-round speed ratios.
FLOPs are counted with torch.utils.flop_counter (forward + backward of one step); MFU = counted FLOP/s over the
best square-matmul FLOP/s of the same device, precision and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from machine import machine_info  # benchmarks/machine.py, beside this script
from torch.utils.flop_counter import FlopCounterMode

from dogclf.models import create_model
from dogclf.train import cpu_has_bf16

NUM_CLASSES = 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    preset: str
    image_size: int

    @classmethod
    def parse(cls, text: str) -> Case:
        preset, _, size = text.partition("@")
        if not size.isdigit():
            raise SystemExit(f"--models: {text!r} is not PRESET@SIZE, e.g. gmlp-ti@224")
        return cls(preset, int(size))

    def __str__(self) -> str:
        return f"{self.preset} @ {self.image_size} px"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...] | None = None) -> float:
    """Best FLOP/s of square matmuls on this device, precision and thread count."""
    sizes = sizes or ((1024, 2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048))
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        reps, start = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - start < 0.5:
            a @ b
            reps += 1
            if reps == 3:
                sync(device)
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def timm_gmlp(ours: torch.nn.Module, image_size: int) -> torch.nn.Module:
    """timm's gMLP with our model's patch size, width and depth (gmlp_ti16_224 / gmlp_s16_224 at their sizes)."""
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(
        num_classes=NUM_CLASSES,
        img_size=image_size,
        patch_size=ours.patch_size,
        num_blocks=len(ours.blocks),
        embed_dim=ours.patch_embed.out_channels,
        mlp_ratio=ours.blocks[0].proj_in.out_features // ours.patch_embed.out_channels,
        block_layer=SpatialGatingBlock,
        mlp_layer=GatedMlp,
    )


def training_step(
    model: torch.nn.Module, batch: int, image_size: int, precision: str, device: torch.device
) -> Callable[[], None]:
    """A closure doing one full training step on a fixed random batch."""
    model = model.to(device).train()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def interleaved(steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int, device: torch.device):
    """Median seconds per step of each closure, and the per-round time ratios against the first one."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats):
        order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(timed(steps[name], device))
    first = next(iter(steps))
    ratios = {name: [a / b for a, b in zip(times[name], times[first])] for name in steps}
    return {name: statistics.median(t) for name, t in times.items()}, {n: statistics.median(r) for n, r in ratios.items()}


def step_flops(model: torch.nn.Module, batch: int, image_size: int, device: torch.device) -> int:
    """FLOPs of one forward + backward, counted (matmuls and convolutions; elementwise ops count as 0)."""
    model = model.to(device).train()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(batch, dtype=torch.long, device=device)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def build(case: Case) -> torch.nn.Module:
    kwargs = {"drop_path_rate": 0.0} if case.preset.startswith("gmlp") else {"dropout": 0.0}
    return create_model(case.preset, num_classes=NUM_CLASSES, image_size=case.image_size, **kwargs)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--models", default="gmlp-nano@64,gmlp-ti@112,gmlp-ti@224,basic-mlp@64",
                        help="PRESET@SIZE list; gmlp presets are compared with timm (default: %(default)s)")
    parser.add_argument("--batch-sizes", default="32,64", help="(default: %(default)s)")
    parser.add_argument("--precisions", help="fp32,bf16 (default: both on GPUs and bf16-capable CPUs, else fp32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile(model) against eager, for each model at the first batch size")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    native_bf16 = device.type == "cuda" or cpu_has_bf16()
    precisions = (args.precisions or ("fp32,bf16" if native_bf16 else "fp32")).split(",")
    if unknown := set(precisions) - set(DTYPES):
        raise SystemExit(f"--precisions: unknown {sorted(unknown)}; choose from fp32, bf16")
    cases = [Case.parse(text) for text in args.models.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]

    print(f"# Training step\n{machine_info(device)}")
    ceilings = {p: matmul_ceiling(device, DTYPES[p]) for p in precisions}
    if not native_bf16 and "bf16" not in ceilings:
        emulated = matmul_ceiling(device, torch.bfloat16, sizes=(512,))
        print(f"bf16 skipped: this CPU has no native bf16 (matmul {emulated / 1e9:.1f} GFLOP/s, emulated); "
              "force with --precisions fp32,bf16")
    print("Matmul ceiling: " + ", ".join(f"{p} {c / 1e9:.0f} GFLOP/s" for p, c in ceilings.items()) + "\n")

    speed_rows, mfu_rows = [], []
    for case in cases:
        flops_per_image = step_flops(build(case), 1, case.image_size, device)
        for precision in precisions:
            for batch in batches:
                torch.manual_seed(0)
                ours = build(case)
                steps = {"ours": training_step(ours, batch, case.image_size, precision, device)}
                if case.preset.startswith("gmlp"):
                    steps["timm"] = training_step(timm_gmlp(ours, case.image_size), batch, case.image_size,
                                                  precision, device)
                seconds, ratios = interleaved(steps, warmup=args.warmup, repeats=args.steps, device=device)
                speed = {k: batch / s for k, s in seconds.items()}
                vs_timm = [f"{speed['timm']:.1f}", f"{ratios['timm']:.2f}x"] if "timm" in speed else ["-", "-"]
                speed_rows.append([str(case), precision, str(batch), f"{speed['ours']:.1f}", *vs_timm])
                achieved = flops_per_image * speed["ours"]
                mfu_rows.append([str(case), precision, str(batch), f"{flops_per_image / 1e9:.3g}",
                                 f"{achieved / 1e9:.3g}", f"{ceilings[precision] / 1e9:.0f}",
                                 f"{achieved / ceilings[precision]:.2g}"])
                print(f"  measured {case}, {precision}, batch {batch}", file=sys.stderr)

    print("## Training step, images/s (median of", args.steps, "steps after", args.warmup, "warm-up)\n")
    print(table(["model", "precision", "batch", "ours img/s", "timm img/s", "ours/timm"], speed_rows))
    print("\n## MFU (counted FLOPs x img/s / measured matmul ceiling)\n")
    print(table(["model", "precision", "batch", "GFLOP/img (fwd+bwd)", "GFLOP/s", "ceiling GFLOP/s", "MFU"],
                mfu_rows))
    if args.compile:
        print("\n## torch.compile (default mode) against eager, batch", batches[0], "\n")
        print(table(["model", "precision", "eager img/s", "compiled img/s", "speed-up", "compile s"],
                    [compile_row(case, batches[0], precision, device, args) for case in cases
                     for precision in precisions]))


def compile_row(case: Case, batch: int, precision: str, device: torch.device, args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    eager = build(case)
    compiled = build(case)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()  # in place: same module, same parameters
    steps = {"eager": training_step(eager, batch, case.image_size, precision, device),
             "compiled": training_step(compiled, batch, case.image_size, precision, device)}
    first = timed(steps["compiled"], device)  # compiles forward and backward
    steady = statistics.median(timed(steps["compiled"], device) for _ in range(3))
    seconds, ratios = interleaved(steps, warmup=args.warmup, repeats=args.steps, device=device)
    speed = {k: batch / s for k, s in seconds.items()}
    return [str(case), precision, f"{speed['eager']:.1f}", f"{speed['compiled']:.1f}",
            f"{1 / ratios['compiled']:.2f}x", f"{first - steady:.0f}"]


if __name__ == "__main__":
    main()
