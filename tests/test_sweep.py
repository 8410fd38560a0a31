"""Sweep files: base x runs x grid -> validated job configs."""

import pytest

from dogclf.config import REPO_ROOT, ConfigError
from dogclf.sweep import load_sweep, sweep_jobs


def test_base_runs_and_grid_combine(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: {trainer.max_epochs: 3, optim.lr: 0.01}\n"
                    "runs:\n  - {optim.loss: ce}\n  - {optim.loss: ldam, optim.lr: 0.02}\n"
                    "grid:\n  trainer.seed: [0, 1]\n")
    points = load_sweep(path)
    assert len(points) == 4 and points[0] == {"trainer.max_epochs": 3, "optim.lr": 0.01, "optim.loss": "ce",
                                              "trainer.seed": 0}
    jobs = sweep_jobs("gmlp", [("trainer.max_epochs", 7)], points)
    assert [(j.optim.loss, j.optim.lr, j.trainer.seed) for j in jobs] == [
        ("ce", 0.01, 0), ("ce", 0.01, 1), ("ldam", 0.02, 0), ("ldam", 0.02, 1)]
    assert {j.trainer.max_epochs for j in jobs} == {3}  # the sweep file wins over command-line overrides


@pytest.mark.parametrize(("text", "message"), [
    ("{}", "defines no runs"),
    ("grid: {optim.lr: []}", "non-empty list"),
    ("runs: {optim.lr: 1}", "list of"),
    ("sweep: 1", "unknown top-level"),
])
def test_bad_sweep_files(tmp_path, text, message):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_shipped_sweeps_are_valid():
    for path in sorted((REPO_ROOT / "jobs" / "sweeps").glob("*.yaml")):
        assert sweep_jobs("gmlp", [], load_sweep(path)), path
