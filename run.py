#!/usr/bin/env python3
"""One entry point: parses the command line and dispatches to a subcommand.

    python run.py convert   --layout fusedkv --source PATH --out DIR
    python run.py uptrain   --config configs/<recipe>.yaml
    python run.py validate  --source PATH --candidate DIR
    python run.py generate  --out FILE.jsonl   (the source's own text, for loss: kd without a dataset)
    python run.py demo      (the whole pipeline on the embedded SmolLM2-135M)

`kvshare <command> ...` (installed by `pip install -e .`, make venv) is the same entry point.

User mistakes print one line and exit 2; every subcommand returns its own exit code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import NoReturn

# name -> module that provides add_arguments(parser) and main(args) -> int
SUBCOMMANDS = {
    "convert": ("convert.cli", "map a checkpoint to a shared-KV layout"),
    "uptrain": ("uptrain.cli", "recover quality with a DeepSpeed ZeRO job"),
    "validate": ("validate.cli", "perplexity and KV-cache bytes, candidate vs source"),
    "generate": ("uptrain.generate_cli", "text the source writes itself: data for data-free distillation"),
    "demo": ("demo", "convert, uptrain briefly and validate the embedded SmolLM2-135M (or --source)"),
}


def print_error(message: str) -> None:
    """A user mistake as the user sees it: one line, however long (no wrapping, no markup read into it)."""
    from rich.markup import escape

    from common.console import console

    one_line = " ".join(message.split())  # a message quoting a library's text may span lines
    console.print(f"[bold red]error:[/] {escape(one_line)}", highlight=False, soft_wrap=True)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 like any other user mistake, not a usage block.
    Subparsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C: every `finally` and
    `except BaseException` removes what it staged (kill -9 leftovers go with the next run instead)."""


def _terminate(signum, frame) -> NoReturn:
    raise Terminated


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only the chosen one is imported (keeps `--help` and start-up fast)."""
    prog = "kvshare" if os.path.basename(sys.argv[0]) == "kvshare" else "run.py"  # as the user typed it
    parser = Parser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sub_parser)
        sub_parser.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from common.console import console
    from common.errors import UserError
    from common.sources import writable_module_cache

    writable_module_cache()  # before any stage imports transformers

    argv = sys.argv[1:] if argv is None else argv
    # The deepspeed launcher puts --local_rank=N before the subcommand; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return importlib.import_module(args.module).main(args)
    except UserError as err:
        print_error(str(err))
        return 2
    except Terminated:
        console.print("[bold red]terminated[/]")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
