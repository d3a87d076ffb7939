"""`run.py validate`: the command line of the validate stage (validate/stage.py).

    python run.py validate --source PATH --candidate DIR [--control DIR]

Exit code 0 when the candidate is at parity with its reference, 1 when not, 2 on bad input.
"""
from __future__ import annotations

import argparse

from common.options import add_option_arguments, options_from_args

from .options import FLAGS, ValidateOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, ValidateOptions, FLAGS)


def main(args: argparse.Namespace) -> int:
    from .stage import run

    return run(options_from_args(ValidateOptions, args, FLAGS)).exit_code
