"""`dogclf` command line. `dogclf train` and `python app.py` share one parser and one entry point."""

from __future__ import annotations

import argparse
import os
import sys
import time

from dogclf.config import ConfigError, JobConfig, StorageError, load_job

# FloatingPointError: the loss diverged; StorageError: the disk filled up or the run directory went away mid-run
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, StorageError, FloatingPointError)


def add_train_arguments(parser: argparse.ArgumentParser, *, cluster: bool = False) -> None:
    """The job-spec options shared by app.py, `dogclf train` and the cluster launchers (`cluster=True`: the run
    directory gains a job id level and the output root defaults to $DOGCLF_OUTPUT)."""
    parser.add_argument("--mode", default="gmlp", help="job spec: jobs/<mode>.yaml (gmlp, basic-mlp) or a .yaml path")
    parser.add_argument("--data", help="data root, one sub-folder per class (default: the job spec's data.root)")
    if cluster:
        parser.add_argument("--output", default=os.environ.get("DOGCLF_OUTPUT"), help="output root on storage all "
                            "nodes share; run directory <output>/<name>/<job id> (default: $DOGCLF_OUTPUT, else the "
                            "job spec's output, ./runs)")
        parser.add_argument("--name", help="run name, the folder grouping this job's runs (default: the job spec's "
                            "name)")
    else:
        parser.add_argument("--output", help="output root; the run directory is <output>/<name> (default: the job "
                            "spec's output, ./runs)")
        parser.add_argument("--name", help="run name (default: the job spec's name); an existing run with a "
                            "checkpoint is resumed, unless another run is training in it: this run then gets a new <name>-2")
    parser.add_argument("--max-epochs", type=int, help="number of epochs (default: the job spec's trainer.max_epochs)")
    parser.add_argument("--init-from", metavar="PATH", help="start from weights in PATH: a timm gMLP state dict or a "
                        "dogclf checkpoint (the head is re-initialised when the class count differs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any job-spec field, e.g. --set model.preset=gmlp-ti --set optim.lr=3e-4 "
                        "(repeatable)")


def overrides_from_args(args: argparse.Namespace) -> list[str | tuple[str, str]]:
    """The convenience flags as (key, value) overrides, then the `--set` ones (later wins)."""
    flags = {
        "data.root": args.data,
        "output": args.output,
        "name": args.name,
        "trainer.max_epochs": args.max_epochs,
        "model.init_from": args.init_from,
    }
    return [(key, value) for key, value in flags.items() if value is not None] + args.overrides


def job_from_args(args: argparse.Namespace) -> JobConfig:
    """The job spec of `--mode` with the convenience flags and `--set` overrides applied."""
    return load_job(args.mode, overrides_from_args(args))


def run_train(args: argparse.Namespace) -> int:
    from dogclf.train import Interrupted, train

    cfg = job_from_args(args)
    start = time.perf_counter()
    try:
        metrics = train(cfg)
    except Interrupted as stop:  # Ctrl-C or SIGTERM in training: a checkpoint was saved
        print(stop, file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:  # while the data is read, or after testing
        print("interrupted outside training (nothing new to save); run the same command again to go on", file=sys.stderr)
        return 130
    print_results(metrics, minutes=(time.perf_counter() - start) / 60)
    return 0


def print_results(metrics: dict, minutes: float | None = None) -> None:
    """The results table, per-class test recall, and where the run lives."""
    from dogclf.train import results_table

    print()
    print(results_table([metrics]))
    low, high = metrics["test_balanced_accuracy_ci"]
    print(f"\nTest balanced accuracy {metrics['test_balanced_accuracy']:.3f}, 95% bootstrap CI [{low:.3f}, {high:.3f}]")
    print("Test recall per class (95% Wilson CI, test images):")
    for name, value in metrics["test_per_class_recall"].items():
        low, high = metrics["test_per_class_recall_ci"][name]
        support = metrics["test_per_class_support"][name]
        print(f"  {name:<16} {value:.2f}  [{low:.2f}, {high:.2f}]  n={support}")
    took = f"  ({minutes:.1f} min)" if minutes is not None else ""
    print(f"Run directory: {metrics['run_dir']}{took}")
    print(f"Watch it with: tensorboard --logdir {metrics['run_dir']}/tb")


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults live in dogclf.data.fetch.fetch(): an option left out (None) is not passed on.
    parser.add_argument("--root", default="../shared/white-dogs", help="data root with one sub-folder per class and "
                        "MANIFEST.csv; relative to the working directory (default: %(default)s)")
    parser.add_argument("--breed", dest="breeds", action="append", metavar="CLASS=API_PATH",
                        help="class folder and dog.ceo breed path, e.g. spitz=spitz/japanese (repeatable; replaces the "
                        "default bichon_frise=frise/bichon maltese=maltese samoyed=samoyed spitz=spitz/japanese)")
    parser.add_argument("--max-per-class", type=int, metavar="N", help="stop once a class folder holds N images")
    parser.add_argument("--rate", type=float, help="most requests per second (default 2)")
    parser.add_argument("--retries", type=int, help="retries on network errors, HTTP 429 and 5xx (default 4)")
    parser.add_argument("--backoff", type=float, metavar="SECONDS", help="first retry delay, doubled each retry; "
                        "a Retry-After header wins (default 1)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="per request (default 30)")
    parser.add_argument("--min-distance", type=int, metavar="BITS", help="pHash Hamming distance under which an image "
                        "is a near-duplicate of one already held, in any class (default 10)")
    parser.add_argument("--min-side", type=int, metavar="PX", help="reject images with a shorter side (default 128)")
    parser.add_argument("--api", help="dog.ceo API base URL (default https://dog.ceo/api)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be downloaded; write nothing")


def run_fetch(args: argparse.Namespace) -> int:
    from dogclf.data.fetch import fetch, parse_breeds

    options = ("api", "max_per_class", "rate", "retries", "backoff", "timeout", "min_distance", "min_side")
    kwargs = {key: getattr(args, key) for key in options if getattr(args, key) is not None}
    breeds = parse_breeds(args.breeds) if args.breeds else None
    try:
        fetch(args.root, breeds, dry_run=args.dry_run, **kwargs)
    except KeyboardInterrupt:
        print("interrupted: everything fetched so far is kept; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dogclf", description="Tell white dog breeds apart with gMLP or an MLP.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train locally on one device (resumes an existing run)")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    data = commands.add_parser("data", help="manage the photo folders")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    fetch = data_commands.add_parser("fetch", help="add photos from the public dog.ceo API: verified, re-encoded like "
                                     "the shared set, near-duplicates skipped, provenance in MANIFEST.csv; resumable")
    add_fetch_arguments(fetch)
    fetch.set_defaults(handler=run_fetch)
    report = commands.add_parser("report", help="aggregate run directories into a markdown table (mean +- std over "
                                 "seeds) and confusion-matrix PNGs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or folders holding them")
    report.add_argument("--out", metavar="DIR", help="also write report.md and the confusion-matrix PNGs here")
    report.set_defaults(handler=run_report)
    add_inference_commands(commands)
    return parser


def add_inference_commands(commands) -> None:
    """`evaluate`, `predict` and `export`: use a trained checkpoint (dogclf/inference.py)."""
    checkpoint = {"required": True, "metavar": "CKPT", "help": "a training checkpoint: <run>/checkpoints/last.ckpt "
                  "or best-epochNNN.ckpt (the EMA weights are used when the run had EMA)"}
    devices = {"default": "auto", "help": "auto (a GPU when there is one), cpu or cuda[:N] (default: %(default)s)"}
    evaluate = commands.add_parser("evaluate", help="metrics of a checkpoint on a folder with one sub-folder per "
                                   "class, or on one split of its run")
    evaluate.add_argument("--checkpoint", **checkpoint)
    evaluate.add_argument("--data", required=True, metavar="DIR", help="one sub-folder of images per class (matched "
                          "to the model's classes by name); with --split, the data root the run trained on")
    evaluate.add_argument("--split", choices=("train", "val", "test"), help="evaluate exactly this split of the run "
                          "(read from --split-csv; default: test when --split-csv is given)")
    evaluate.add_argument("--split-csv", metavar="PATH", help="a run's split.csv (default with --split: the "
                          "checkpoint's <run>/split.csv)")
    evaluate.add_argument("--out", metavar="DIR", help="where the confusion-matrix PNG and the result JSON go "
                          "(default: <run>/eval)")
    evaluate.add_argument("--json", action="store_true", help="print the result as one JSON object")
    evaluate.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the bootstrap intervals (default: %(default)s, "
                          "the training default)")
    evaluate.add_argument("--device", **devices)
    evaluate.set_defaults(handler=run_evaluate)
    predict = commands.add_parser("predict", help="top-k breeds of images (files or folders, searched recursively)")
    predict.add_argument("--checkpoint", **checkpoint)
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--top-k", type=int, default=3, help="classes per image (default: %(default)s)")
    predict.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output (default: "
                         "%(default)s)")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: %(default)s)")
    predict.add_argument("--device", **devices)
    predict.set_defaults(handler=run_predict)
    export = commands.add_parser("export", help="write the model with its preprocessing and class names as "
                                 "TorchScript or ONNX")
    export.add_argument("--checkpoint", **checkpoint)
    export.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript", help="(default: "
                        "%(default)s; onnx needs the onnx package, onnxruntime to verify)")
    export.add_argument("--out", required=True, metavar="FILE", help="the file to write (.pt or .onnx)")
    export.set_defaults(handler=run_export)


def _positive(value: int, option: str) -> None:
    if value < 1:
        raise ConfigError(f"{option} {value}: must be 1 or more")


def run_evaluate(args: argparse.Namespace) -> int:
    from dogclf.inference import evaluate, format_evaluation, to_json

    _positive(args.batch_size, "--batch-size")
    result = evaluate(args.checkpoint, args.data, split_csv=args.split_csv, split=args.split, out=args.out,
                      batch_size=args.batch_size, seed=args.seed, device=args.device)
    print(to_json(result) if args.json else format_evaluation(result))
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from dogclf.inference import format_predictions, predict

    _positive(args.batch_size, "--batch-size")
    _positive(args.top_k, "--top-k")
    result = predict(args.checkpoint, args.paths, top_k=args.top_k, batch_size=args.batch_size, device=args.device)
    print(format_predictions(result, args.format))
    if args.format == "table":
        for entry in result["unreadable"]:
            print(f"warning: cannot read {entry['path']}: {entry['error']}", file=sys.stderr)
    return 0 if result["predictions"] else 1


def run_export(args: argparse.Namespace) -> int:
    from dogclf.inference import export

    result = export(args.checkpoint, args.format, args.out)
    diff = result["max_abs_diff"]
    check = f"max |logit difference| {diff:.2e} ({result['verified_with']})" if diff is not None else \
        result["verified_with"]
    print(f"wrote {result['path']} ({result['format']}, {len(result['classes'])} classes, input "
          f"{result['image_size']} px); {check}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dogclf.report import find_runs, markdown_table, summarise, write_confusion_pngs

    groups, classes = summarise(find_runs(args.runs))
    table = markdown_table(groups, classes)
    print(table)
    if args.out:
        out = Path(args.out)
        pngs = write_confusion_pngs(groups, classes, out)
        (out / "report.md").write_text(table + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n")
        print(f"\nwrote {out / 'report.md'} and {len(pngs)} confusion-matrix PNG(s)")
    return 0


def run(handler, args: argparse.Namespace) -> int:
    """Call a command handler; a user error is one line on stderr and exit status 2, never a traceback."""
    from dogclf.data import DataError

    try:
        return handler(args)
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
