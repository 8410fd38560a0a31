"""Using a trained model: `dogclf evaluate`, `predict`, `export`, and the TensorBoard extras of training, on one
tiny real run (gmlp-pico, 32 px, 8 images per class, EMA on so that the EMA weights are what must be used)."""

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import tiny_job
from torchvision.transforms.v2.functional import center_crop

from dogclf.cli import main
from dogclf.data import build_eval_transform, decode_image, resize_size
from dogclf.inference import load_classifier, read_torchscript_metadata
from dogclf.train import train

CLASSES = ["bichon_frise", "maltese", "samoyed", "spitz"]


@pytest.fixture(scope="module")
def run(white_dogs, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    # fp32 on the CPU: evaluation recomputes the test logits and must get the very same predictions.
    cfg = tiny_job(white_dogs, output, "trainer.max_epochs=2", "optim.ema_decay=0.9", "trainer.precision=32-true",
                   "trainer.accelerator=cpu")
    metrics = train(cfg, progress_bar=False)
    run_dir = output / "tiny"
    return run_dir, metrics, run_dir / "checkpoints" / "last.ckpt"


def dogclf(capsys, *argv):
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def name_of(path):
    return Path(path).name


def images_of(white_dogs, name, n):
    return sorted((white_dogs / name).glob("*.jpg"))[:n]


def test_evaluate_test_split_reproduces_training_metrics(run, white_dogs, tmp_path, capsys):
    run_dir, _, ckpt = run
    saved = json.loads((run_dir / "metrics.json").read_text())
    status, out, _ = dogclf(capsys, "evaluate", "--checkpoint", ckpt, "--data", white_dogs, "--split-csv",
                            run_dir / "split.csv", "--split", "test", "--batch-size", 8, "--json", "--out", tmp_path)
    assert status == 0
    result = json.loads(out)
    assert result["classes"] == saved["classes"] == CLASSES
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class_recall", "per_class_precision",
                "per_class_support", "confusion_matrix", "balanced_accuracy_ci", "per_class_recall_ci"):
        assert result[key] == saved[f"test_{key}"], key
    assert result["loss"] == pytest.approx(saved["test_loss"], rel=1e-5)
    assert result["images"] == sum(saved["test_per_class_support"].values())
    assert result["unknown_classes"] == {} and result["unreadable"] == [] and result["changed_since_split"] == []
    assert (tmp_path / "last-test-confusion.png").stat().st_size > 1000
    assert json.loads((tmp_path / "last-test.json").read_text()) == result


def test_evaluate_folder_reports_unknown_class_and_missing_ones(run, white_dogs, tmp_path, capsys):
    _, _, ckpt = run
    data = tmp_path / "data"
    for name, files in (("samoyed", images_of(white_dogs, "samoyed", 3)), ("poodle", images_of(white_dogs, "maltese", 2))):
        (data / name).mkdir(parents=True)
        for path in files:
            shutil.copy(path, data / name / path.name)
    (data / "samoyed" / "broken.jpg").write_text("not a jpeg")
    status, out, _ = dogclf(capsys, "evaluate", "--checkpoint", ckpt, "--data", data, "--json")
    assert status == 0
    result = json.loads(out)
    assert result["images"] == 3 and result["per_class_support"] == {"bichon_frise": 0, "maltese": 0, "samoyed": 3,
                                                                     "spitz": 0}
    assert result["per_class_recall"]["spitz"] is None  # NaN -> null: no images, recall undefined
    assert result["balanced_accuracy"] == result["per_class_recall"]["samoyed"] == result["accuracy"]
    assert result["unknown_classes"]["poodle"]["images"] == 2
    assert sum(result["unknown_classes"]["poodle"]["predicted"].values()) == 2
    assert [name_of(u["path"]) for u in result["unreadable"]] == ["broken.jpg"]
    assert (ckpt.parent.parent / "eval" / "last-data-confusion.png").is_file()  # default: <run>/eval
    status, text, _ = dogclf(capsys, "evaluate", "--checkpoint", ckpt, "--data", data)
    assert status == 0
    assert "unknown class 'poodle' (not a class of the model, not in the metrics): 2 images" in text
    assert "balanced accuracy" in text and "(no images)" in text and "broken.jpg" in text


def test_predict_table_json_csv(run, white_dogs, tmp_path, capsys):
    _, _, ckpt = run
    (tmp_path / "dogs" / "nested").mkdir(parents=True)
    files = images_of(white_dogs, "spitz", 2) + images_of(white_dogs, "maltese", 1)
    for i, path in enumerate(files):
        shutil.copy(path, tmp_path / "dogs" / ("nested" if i else ".") / path.name)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"\x89PNG broken")
    args = ["predict", "--checkpoint", ckpt, tmp_path / "dogs", tmp_path / "missing.jpg", "--top-k", 2]

    status, out, _ = dogclf(capsys, *args, "--format", "json")
    assert status == 0
    result = json.loads(out)
    assert len(result["predictions"]) == 3 and len(result["unreadable"]) == 2
    for entry in result["predictions"]:
        top = entry["top"]
        assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"] > 0
        assert {t["class"] for t in top} <= set(CLASSES) and sum(t["probability"] for t in top) <= 1 + 1e-6
    best = {entry["path"]: entry["top"][0]["class"] for entry in result["predictions"]}

    status, out, _ = dogclf(capsys, *args, "--format", "csv")
    rows = list(csv.DictReader(out.splitlines()))
    assert status == 0 and len(rows) == 3 * 2 + 2
    assert {r["path"]: r["class"] for r in rows if r["rank"] == "1"} == best
    assert sorted(name_of(r["path"]) for r in rows if r["error"]) == ["broken.png", "missing.jpg"]

    status, out, err = dogclf(capsys, *args)  # table
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["path", "top-1", "top-2"] and len(lines) == 4
    for line in lines[1:]:
        path, top1, p1, _, p2 = line.split()
        assert best[path] == top1 and float(p1) >= float(p2)
    assert len(err.splitlines()) == 2 and all(line.startswith("warning: cannot read") for line in err.splitlines())


def real_batch(white_dogs, image_size):
    """Four real photos as uint8 crops: what an exported model's user feeds (after dividing by 255)."""
    paths = [p for name in CLASSES for p in images_of(white_dogs, name, 1)]
    return [center_crop(decode_image(p, resize_size(image_size)), [image_size, image_size]) for p in paths]


def checkpoint_logits(ckpt, crops):
    module = load_classifier(ckpt)
    transform = build_eval_transform(module.hparams.image_size)
    normalised = torch.stack([transform(c) for c in crops])
    with torch.no_grad():
        evaluation = module(normalised) - module.logit_offset
        raw_model = module.model(normalised)
    return module, evaluation, raw_model


def test_export_torchscript_reproduces_checkpoint_logits(run, white_dogs, tmp_path, capsys):
    _, _, ckpt = run
    status, out, _ = dogclf(capsys, "export", "--checkpoint", ckpt, "--format", "torchscript", "--out",
                            tmp_path / "dogs.pt")
    assert status == 0 and out.startswith(f"wrote {tmp_path / 'dogs.pt'}")
    crops = real_batch(white_dogs, 32)
    module, expected, raw_model = checkpoint_logits(ckpt, crops)
    assert module.ema is not None and not torch.allclose(expected, raw_model)  # EMA differs from the raw weights
    exported = torch.jit.load(str(tmp_path / "dogs.pt"))
    with torch.no_grad():
        got = exported(torch.stack(crops).float() / 255)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert list(exported.classes) == CLASSES and exported.image_size == 32 and exported.resize_size == 37
    meta = read_torchscript_metadata(tmp_path / "dogs.pt")
    assert meta["classes"] == CLASSES and meta["image_size"] == 32 and meta["ema"] is True
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_export_onnx(run, white_dogs, tmp_path, capsys, monkeypatch):
    _, _, ckpt = run
    args = ["export", "--checkpoint", ckpt, "--format", "onnx", "--out", tmp_path / "dogs.onnx"]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "onnx", None)  # as if not installed
        status, _, err = dogclf(capsys, *args)
    assert status == 2 and err.startswith("error: --format onnx needs the onnx package") and err.count("\n") == 1
    import onnx  # the test extra installs both: no skip on CI
    import onnxruntime
    status, out, _ = dogclf(capsys, *args)
    assert status == 0 and "(onnxruntime)" in out
    model = onnx.load(str(tmp_path / "dogs.onnx"))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["dogclf"])
    assert meta["classes"] == CLASSES
    crops = real_batch(white_dogs, 32)
    _, expected, _ = checkpoint_logits(ckpt, crops)
    session = onnxruntime.InferenceSession(str(tmp_path / "dogs.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": (torch.stack(crops).float() / 255).numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-4, rtol=0)


def test_tensorboard_extras(run):
    run_dir, metrics, _ = run
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    grids = acc.Images("val/misclassified")
    assert len(grids) == metrics["epochs"] and grids[-1].width > 100  # one per validation epoch
    curves = {f"val/pr_curve/{name}" for name in CLASSES}
    assert curves <= set(acc.Tags()["tensors"]) and curves <= set(acc.PluginTagToContent("pr_curves"))
    curve = acc.Tensors("val/pr_curve/samoyed")
    assert len(curve) == metrics["epochs"] and curve[-1].tensor_proto.tensor_shape.dim[0].size == 6  # TP FP TN FN P R
    assert any(tag.startswith("lr-AdamW") for tag in acc.Tags()["scalars"])  # LearningRateMonitor


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["evaluate", "--checkpoint", "{tmp}/none.ckpt", "--data", "{data}"], "checkpoint {tmp}/none.ckpt does not"),
        (["predict", "--checkpoint", "{tmp}/notes.ckpt", "{data}"], "is not a dogclf checkpoint"),
        (["export", "--checkpoint", "{tmp}/plain.ckpt", "--out", "{tmp}/m.pt"], "has no Lightning state_dict"),
        (["evaluate", "--checkpoint", "{ckpt}", "--data", "{tmp}/nowhere"], "data folder {tmp}/nowhere does not exist"),
        (["evaluate", "--checkpoint", "{ckpt}", "--data", "{data}", "--split", "test", "--split-csv", "{tmp}/x.csv"],
         "split file {tmp}/x.csv does not exist"),
    ],
)
def test_user_errors_are_one_line(argv, message, run, white_dogs, tmp_path, capsys):
    _, _, ckpt = run
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    fill = {"tmp": tmp_path, "data": white_dogs, "ckpt": ckpt}
    status, out, err = dogclf(capsys, *(a.format(**fill) for a in argv))
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message.format(**fill) in err and err.count("\n") == 1
