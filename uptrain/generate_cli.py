"""`run.py generate`: the command line of uptrain/generate.py (text the source writes, for `loss: kd`).

    python run.py generate --out data/self.jsonl --samples 2000 --tokens 256
    python run.py uptrain --config configs/uptrain-demo-cpu.yaml --data data/self.jsonl --set loss=kd
"""
from __future__ import annotations

import argparse

from common.options import add_option_arguments, options_from_args

from .generate import FLAGS, GenerateOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, GenerateOptions, FLAGS)


def main(args: argparse.Namespace) -> int:
    from .generate import run

    run(options_from_args(GenerateOptions, args, FLAGS))
    return 0
