"""python -m sdturbo.train.mini [--stage ...]: the same as `sdturbo train mini`."""

import argparse
import sys

from ...cli import run_command
from .cli import add_train_arguments, run_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m sdturbo.train.mini")
    add_train_arguments(parser)
    sys.exit(run_command(run_train, parser.parse_args()))
