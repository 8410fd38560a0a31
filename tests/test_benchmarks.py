"""Smoke tests of the scripts in benchmarks/: each runs as a real subprocess, with --quick, on the shared photos, from
a directory outside the checkout, and must print its markdown tables with sane numbers.

They check that a script works, never how fast anything is: its numbers are measured on a quiet machine by hand.
Helpers: `run_script(name, *args, cwd=...)` runs benchmarks/<name> (asserting success unless check=False),
`tables(stdout)` returns each markdown table as a list of {column: cell} rows.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # a quick run takes under 30 s on 2 busy cores; the limit only stops a hang


def run_script(name: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / name), *args], cwd=cwd, check=False,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    if check:
        assert result.returncode == 0, f"{name} {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    return result


def tables(text: str) -> list[list[dict[str, str]]]:
    """Markdown tables in `text` (a header line, a |---| line, rows) as lists of {column: cell}."""
    found, lines = [], text.splitlines()
    for i in range(len(lines) - 1):
        starts_table = lines[i].startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))
        if starts_table and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
            found.append(rows)
    return found


def positive(cell: str) -> float:
    value = float(cell)
    assert value > 0, cell
    return value


def test_data_loader_quick_prints_loader_and_decode_tables(white_dogs: Path, tmp_path: Path) -> None:
    # No --data: the default ../shared/white-dogs must resolve from the repository root, not from the cwd.
    out = run_script("data_loader.py", "--quick", "--threads", "1", cwd=tmp_path).stdout
    assert any(line.startswith("Machine: ") and "torch threads" in line for line in out.splitlines())
    loader, decode = tables(out)
    assert [(row["job"].split()[0], row["workers"]) for row in loader] == [
        (job, workers) for job in ("gmlp", "basic-mlp") for workers in ("0", "1", "2")
    ]
    for row in loader:
        positive(row["1st batch s"])
        ratio = positive(row["loader img/s"]) / positive(row["step img/s"])
        assert float(row["loader/step"]) == pytest.approx(ratio, rel=0.05, abs=0.1)
        assert row[">= 3x"] == ("pass" if float(row["loader/step"]) >= 3 else "FAIL")
    (row,) = decode  # both jobs decode the same photos at the same size: one measurement
    assert row["jobs"] == "gmlp, basic-mlp" and row["short side px"] == "37"
    for column in ("photos", "cold img/s", "cold ms/img", "1-thread ms/img", "warm img/s", "cache MB"):
        positive(row[column])


def test_end_to_end_quick_prints_epoch_and_summary_tables(white_dogs: Path, tmp_path: Path) -> None:
    out = run_script("end_to_end.py", "--quick", "--device", "cpu", cwd=tmp_path).stdout
    epochs, summary = tables(out[out.index("# End to end"):])
    assert [row["epoch"] for row in epochs] == ["1", "2"]
    for row in epochs:
        for column in ("train s", "train img/s", "val s", "epoch s", "elapsed s"):
            positive(row[column])
        assert 0 <= float(row["val balanced acc"]) <= 1
    assert float(epochs[0]["elapsed s"]) < float(epochs[1]["elapsed s"])
    values = {row["summary"].split(" (")[0]: row["value"] for row in summary}
    for key in ("setup s", "mean epoch s", "train img/s", "total wall s"):
        positive(values[key])
    assert re.fullmatch(r"[\d.]+ s after fit start \(epoch [12]; [\d.]+ s with setup\)|not reached in 2 epochs",
                        values["time to val balanced acc >= 0.35"])
    assert 0 <= float(values["test balanced acc"]) <= 1
    assert not list(tmp_path.iterdir()), "nothing may be left in the working directory"


@pytest.mark.parametrize("script", ["data_loader.py", "end_to_end.py"])
def test_missing_data_root_is_a_one_line_error(script: str, tmp_path: Path) -> None:
    result = run_script(script, "--quick", "--data", str(tmp_path / "absent"), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: data root {tmp_path / 'absent'} does not exist: pass --data DIR, a folder with one sub-folder per "
        "class"
    )


def load_model_step(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))  # as when run as a script: machine.py beside it
    spec = importlib.util.spec_from_file_location("model_step", REPO_ROOT / "benchmarks" / "model_step.py")
    module = sys.modules["model_step"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_model_step_compares_the_same_function_as_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The timm model the benchmark races against computes exactly our function once given our weights."""
    from dogclf.models.gmlp import timm_to_dogclf

    model_step = load_model_step(monkeypatch)
    torch.manual_seed(0)
    ours = model_step.build(model_step.Case("gmlp-nano", 64)).eval()
    theirs = model_step.timm_gmlp(ours, 64).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)  # every weight random: the near-identity gate init would hide a wrong mapping
    ours.load_state_dict(timm_to_dogclf(theirs.state_dict()), strict=True)
    x = torch.randn(3, 3, 64, 64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_model_step_prints_speed_mfu_and_compile_tables(tmp_path: Path) -> None:
    args = ["--device", "cpu", "--models", "gmlp-pico@32,basic-mlp@32", "--batch-sizes", "4", "--precisions", "fp32",
            "--steps", "2", "--warmup", "1", "--threads", "1"]
    speed, mfu = tables(run_script("model_step.py", *args, cwd=tmp_path).stdout)
    assert [(row["model"], row["batch"]) for row in speed] == [("gmlp-pico @ 32 px", "4"), ("basic-mlp @ 32 px", "4")]
    gmlp, mlp = speed
    positive(gmlp["timm img/s"])
    positive(gmlp["ours/timm"].rstrip("x"))
    assert (mlp["timm img/s"], mlp["ours/timm"]) == ("-", "-")  # no timm counterpart
    for row in mfu:
        assert 0 < float(row["MFU"]) <= 1.5 and positive(row["GFLOP/img (fwd+bwd)"])
    # FLOPs are counted, not estimated: the pico model's matmuls (patch 8, dim 32, 2 blocks) x 3 for forward and
    # backward, except the patch embedding, whose input needs no gradient (x 2).
    tokens, dim, ffn = (32 // 8) ** 2, 32, 6 * 32
    embed = 2 * tokens * 3 * 8 * 8 * dim
    blocks = 2 * 2 * tokens * (dim * ffn + ffn // 2 * dim + tokens * ffn // 2)
    expected = 2 * embed + 3 * (blocks + 2 * dim * 4)
    assert float(mfu[0]["GFLOP/img (fwd+bwd)"]) == pytest.approx(expected / 1e9, rel=0.01)


def test_gpu_script_runs_small_on_cpu(white_dogs: Path, tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu.sh"), "--cpu-smoke", "--data", str(white_dogs)],
                            cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=2 * TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    found = tables(result.stdout)
    assert found[0][0]["model"] == "gmlp-pico @ 32 px" and positive(found[0][0]["ours img/s"])
    summary = {row["summary"].split(" (")[0]: row["value"] for row in found[-1]}
    positive(summary["train img/s"])
