"""One line for the top of a benchmark's output: CPU model, cores, GPU, torch version and threads, load average."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info(device: torch.device) -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor() or "unknown CPU")
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores{gpu}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads; load average {load} (1, 5, 15 min)")
