"""`run.py uptrain`: the command line of the uptrain stage (uptrain/stage.py).

    python run.py uptrain --config configs/uptrain-demo-cpu.yaml
    python run.py uptrain --config configs/uptrain-demo-cpu.yaml --resume
    python run.py uptrain --config configs/uptrain-demo-cpu.yaml --control-arm   # the matched-compute control
    python run.py uptrain --config configs/uptrain-smollm2-fusedkv.yaml --prepare-only   # tokenize, then stop
    deepspeed --num_gpus 8 run.py uptrain --config configs/uptrain-smollm2-fusedkv.yaml
"""
from __future__ import annotations

import argparse

from common.options import add_option_arguments, options_from_args

from .recipe import Recipe

FLAGS = ("model", "source", "data", "out", "control_arm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_option_arguments(parser, Recipe, FLAGS, config_help="YAML recipe (see configs/); flags and --set override it")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--resume-from", metavar="TAG", help="continue from checkpoint TAG (e.g. step100)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the token stores of data and eval_data, then stop (tokenize once ahead of a job)")


def main(args: argparse.Namespace) -> int:
    from .stage import prepare, run

    recipe = options_from_args(Recipe, args, FLAGS)
    if args.prepare_only:
        prepare(recipe)
    else:
        run(recipe, args.resume, args.resume_from)
    return 0
