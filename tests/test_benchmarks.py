"""Smoke tests of the scripts in benchmarks/: each runs as a real subprocess, with --quick, on the shared photos, from
a directory outside the checkout, and must print its markdown tables with sane numbers.

They check that a script works, never how fast anything is: its numbers are measured on a quiet machine by hand.
Helpers: `run_script(name, *args, cwd=...)` runs benchmarks/<name> (asserting success unless check=False),
`tables(stdout)` returns each markdown table as a list of {column: cell} rows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

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
                        values["time to val balanced acc >= 0.25"])
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
