"""`run.py convert`: the command line of the convert stage (convert/stage.py).

    python run.py convert --layout fusedkv --init reconstruct --out checkpoints/smollm2-fusedkv
    python run.py convert --config configs/convert-smollm2-fusedkv.yaml --dry-run
"""
from __future__ import annotations

import argparse

from common.options import add_option_arguments, options_from_args

from .options import FLAGS, ConvertOptions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, ConvertOptions, FLAGS)


def main(args: argparse.Namespace) -> int:
    from .stage import run

    run(options_from_args(ConvertOptions, args, FLAGS))
    return 0
