"""End-to-end local training on a small subset of the real photos: run directory, TensorBoard, resume."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dogclf.checkpointing import atomic_torch_save, resume_checkpoint
from dogclf.config import REPO_ROOT, ConfigError, load_job
from dogclf.train import resolve_precision, train

TINY = [
    "model.preset=gmlp-pico",
    "data.image_size=32",
    "data.max_per_class=8",
    "data.batch_size=8",
    "trainer.log_every_n_steps=1",
    "optim.warmup_epochs=0",
]


def tiny_job(white_dogs, output, *extra):
    return load_job("gmlp", [*TINY, f"data.root={white_dogs}", f"output={output}", "name=tiny", *extra])


@pytest.fixture(scope="module")
def trained(white_dogs, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    metrics = train(tiny_job(white_dogs, output, "trainer.max_epochs=2"))
    return output / "tiny", metrics


def events(run_dir):
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_run_directory_layout(trained):
    run_dir, _ = trained
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))
    rows = (run_dir / "split.csv").read_text().splitlines()
    assert rows[0] == "path,class,split,sha1"
    assert {row.split(",")[2] for row in rows[1:]} == {"train", "val", "test"}
    stats = json.loads((run_dir / "class_stats.json").read_text())
    train_rows = [row.split(",") for row in rows[1:] if row.split(",")[2] == "train"]
    assert stats["train_counts"] == [sum(r[1] == c for r in train_rows) for c in stats["classes"]]
    assert math.isclose(sum(stats["sampled_share"]), 1.0) and math.isclose(sum(stats["prior"]), 1.0)


def test_metrics_json(trained):
    run_dir, metrics = trained
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ["train_loss", "val_loss", "test_loss", "test_accuracy", "test_balanced_accuracy", "test_macro_f1",
                "test_per_class_recall", "classes", "epochs", "global_step"]:
        assert key in saved, key
    assert saved["classes"] == ["bichon_frise", "maltese", "samoyed", "spitz"]
    assert set(saved["test_per_class_recall"]) == set(saved["classes"])
    assert saved["epochs"] == 2 and saved["global_step"] == metrics["global_step"] > 0
    low, high = saved["test_balanced_accuracy_ci"]
    assert low <= saved["test_balanced_accuracy"] <= high
    for name, (low, high) in saved["test_per_class_recall_ci"].items():
        assert 0 <= low <= saved["test_per_class_recall"][name] <= high <= 1
    assert set(saved["test_shot_group_recall"]) == {"many", "medium", "few"}
    assert 0 <= saved["test_balanced_accuracy"] <= 1 and saved["test_loss"] > 0 and saved["train_loss"] > 0


def test_tensorboard_has_scalars_confusion_matrix_and_hparams(trained):
    run_dir, _ = trained
    acc = events(run_dir)
    scalars = set(acc.Tags()["scalars"])
    for tag in ["train/loss_step", "train/loss_epoch", "val/loss", "val/balanced_accuracy", "val/macro_f1",
                "val/recall/samoyed", "val/precision/spitz", "perf/train_images_per_s", "test/balanced_accuracy",
                "hp/test_balanced_accuracy"]:
        assert tag in scalars, tag
    assert any(tag.startswith("lr-AdamW") for tag in scalars)
    assert "val/confusion_matrix" in acc.Tags()["images"]
    image = acc.Images("val/confusion_matrix")
    assert len(image) == 2 and image[0].width > 100  # one per validation epoch
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")


def test_resume_continues_global_step(trained, white_dogs):
    run_dir, first = trained
    steps_per_epoch = first["global_step"] // 2
    metrics = train(tiny_job(white_dogs, run_dir.parent, "trainer.max_epochs=3"))
    assert metrics["epochs"] == 3
    assert metrics["global_step"] == first["global_step"] + steps_per_epoch
    val_steps = [event.step for event in events(run_dir).Scalars("val/loss")]
    assert val_steps == sorted(set(val_steps)) and len(val_steps) == 3  # no epoch redone or skipped
    # The same command on a finished run trains nothing more and reports the same final numbers.
    again = train(tiny_job(white_dogs, run_dir.parent, "trainer.max_epochs=3"))
    assert again["global_step"] == metrics["global_step"] and again["train_loss"] == metrics["train_loss"]
    assert again["test_loss"] == pytest.approx(metrics["test_loss"])


def test_basic_mlp_trains(white_dogs, tmp_path):
    cfg = load_job("basic-mlp", [*TINY[1:], f"data.root={white_dogs}", f"output={tmp_path}", "trainer.max_epochs=1"])
    metrics = train(cfg)
    assert metrics["architecture"] == "basic-mlp" and metrics["epochs"] == 1


def test_posthoc_adjustment_is_tuned_on_validation(white_dogs, tmp_path):
    cfg = tiny_job(white_dogs, tmp_path, "trainer.max_epochs=1", "optim.posthoc_adjust=true", "optim.loss=focal",
                   "optim.label_smoothing=0")
    metrics = train(cfg)
    assert metrics["posthoc_tau"] in [i / 4 for i in range(13)]
    # tau = 0 (no adjustment) is in the grid, so the tuned validation score is at least the raw one
    assert metrics["val_balanced_accuracy_posthoc"] >= metrics["val_balanced_accuracy"] - 1e-9


def test_precision_auto():
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("auto", "cpu") in ("bf16-mixed", "32-true")


def test_atomic_save_keeps_old_file_when_write_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises((TypeError, AttributeError)):
        atomic_torch_save({"step": 2, "bad": lambda: None}, path)  # unpicklable: write fails midway
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_non_finite_loss_stops_training_and_saves_nothing_bad(white_dogs, tmp_path):
    cfg = tiny_job(white_dogs, tmp_path, "trainer.max_epochs=3", "optim.lr=1e30", "optim.grad_clip=null")
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step \d+ \(epoch 0\)"):
        train(cfg)
    assert not list((tmp_path / "tiny" / "checkpoints").glob("*.ckpt"))  # no checkpoint holds diverged weights


def test_resume_refuses_another_model_or_class_list(trained, white_dogs, tmp_path):
    run_dir, _ = trained
    shutil.copytree(run_dir, tmp_path / "tiny")
    config_before = (tmp_path / "tiny" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model.preset 'gmlp-pico' -> 'basic-mlp'.*another --name"):
        train(tiny_job(white_dogs, tmp_path, "model.preset=basic-mlp", "trainer.max_epochs=3"))
    with pytest.raises(ConfigError, match=r"image_size 32 -> 64"):
        train(tiny_job(white_dogs, tmp_path, "data.image_size=64", "trainer.max_epochs=3"))
    assert (tmp_path / "tiny" / "config.yaml").read_text() == config_before  # nothing overwritten


def test_truncated_checkpoint_is_reported_and_skipped(trained, tmp_path):
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    last = copy / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(copy) == last
    last.write_bytes(last.read_bytes()[:1000])  # what a crash of a non-atomic writer would leave
    os.utime(last)  # and it is the newest file
    with pytest.warns(UserWarning, match="last.ckpt is unreadable"):
        fallback = resume_checkpoint(copy)
    assert fallback.name.startswith("best-epoch")
    for path in (copy / "checkpoints").glob("best-*.ckpt"):
        path.write_bytes(b"")
    with pytest.warns(UserWarning):
        assert resume_checkpoint(copy) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent/dogs"], "/nonexistent/dogs"),
        (["--set", "optim.lr"], "has no '='"),
        (["--set", "model.preset=gmlp-huge"], "gmlp-ti"),
    ],
)
def test_app_user_errors_are_one_line(args, message, tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "app.py"), "--output", str(tmp_path), *args],
                            capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
