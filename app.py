"""Quick local entry point, the same as `dogclf train`: trains one job spec on one device and prints the
results table. `python app.py --mode=gmlp|basic-mlp [--data DIR] [--output DIR] [--max-epochs N] [--set k=v]`."""

import argparse
import sys

from dogclf.cli import add_train_arguments, run, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="app.py", description="Train a job spec locally on one device and print the results table (= dogclf train)."
    )
    add_train_arguments(parser)
    sys.exit(run(run_train, parser.parse_args()))
