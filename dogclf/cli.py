"""`dogclf` command line. `dogclf train` and `python app.py` share one parser and one entry point."""

from __future__ import annotations

import argparse
import sys
import time

from dogclf.config import ConfigError, JobConfig, load_job

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError,)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", default="gmlp", help="job spec: jobs/<mode>.yaml (gmlp, basic-mlp) or a .yaml path")
    parser.add_argument("--data", help="data root, one sub-folder per class (default: the job spec's data.root)")
    parser.add_argument("--output", help="output root; the run directory is <output>/<name> (default: spec's output)")
    parser.add_argument("--name", help="run name (default: the job spec's name); an existing run with a checkpoint "
                        "is resumed")
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
    from dogclf.train import train

    cfg = job_from_args(args)
    start = time.perf_counter()
    metrics = train(cfg)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dogclf", description="Tell white dog breeds apart with gMLP or an MLP.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train locally on one device (resumes an existing run)")
    add_train_arguments(train)
    train.set_defaults(handler=run_train)
    return parser


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
