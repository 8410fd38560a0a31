"""`dogclf report` over real (tiny) run directories."""

import re
import subprocess
import sys

import pytest
import yaml

from dogclf.config import REPO_ROOT, load_job
from dogclf.report import method_label
from dogclf.train import train

TINY = ["model.preset=gmlp-pico", "data.image_size=32", "data.max_per_class=8", "data.batch_size=8",
        "optim.warmup_epochs=0", "trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def runs(white_dogs, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    for name, extra in [("ce-0", ["trainer.seed=0"]), ("ce-1", ["trainer.seed=1"]),
                        ("la-0", ["optim.loss=logit_adjusted", "data.sampler=shuffle"])]:
        train(load_job("gmlp", [*TINY, f"data.root={white_dogs}", f"output={output}", f"name={name}", *extra]))
    return output


def test_method_labels():
    cfg = load_job("gmlp").to_dict()
    cfg["optim"].update(loss="ldam", drw_epoch=20)
    cfg["data"]["sampler"] = "shuffle"
    assert method_label(cfg) == "ldam + DRW@20"
    cfg["optim"].update(loss="focal", drw_epoch=None, class_weighting="effective_number", posthoc_adjust=True)
    cfg["data"]["sampler"] = "balanced"
    assert method_label(cfg) == "focal(gamma=2.0) + effective_number weights + balanced sampler + post-hoc tau"


def test_report_groups_seeds_and_writes_pngs(runs, tmp_path):
    done = subprocess.run([sys.executable, "-m", "dogclf.cli", "report", str(runs), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| gmlp-pico")]
    assert len(rows) == 2  # CE over seeds 0 and 1, logit-adjusted alone
    sampler = yaml.safe_load((REPO_ROOT / "jobs/gmlp.yaml").read_text())["data"]["sampler"]
    expected = "ce" if sampler == "shuffle" else f"ce + {sampler} sampler"
    ce = next(r for r in rows if r.split("|")[2].strip() == expected)
    assert ce.split("|")[3].strip() == "2" and "±" in ce.split("|")[7]
    assert re.search(r"\[\d\.\d\d, \d\.\d\d\]", ce)
    assert len(list(tmp_path.glob("confusion-*.png"))) == 2 and (tmp_path / "report.md").is_file()


def test_report_of_nothing_is_a_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dogclf.cli", "report", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO_ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: no finished run")
