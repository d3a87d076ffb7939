"""Every stage's options the same way: a dataclass, one loader, one command line.

A stage declares its options once, as dataclass fields made with `option()` (default, help text,
choices). From that one declaration:

- `load_options(cls, config, overrides, flags)` reads a YAML file, `--set key=value` overrides and
  the stage's own flags (later wins), types every value from its annotation, checks choices and
  the declared range of every number (`at_least`, `above`, `at_most`, `below`), then calls the
  dataclass's `check()` for rules between options;
- `add_option_arguments(parser, cls, flags)` gives a subcommand `--config`, `--set` and its short
  flags, with help texts that print the dataclass's defaults (never restated by hand);
- `command_line(stage, options, flags)` writes the command that reproduces an options object.

YAML 1.1 reads ``3e-4`` (no dot) as a string and ``.inf``/``.nan`` as floats; values are typed with
the rules below instead, so ``lr: 3e-4`` is a number, ``seq_len: 64.5`` an error, a non-finite
number is refused, an empty text is refused (leave the option out instead), and ``dry_run: "no"``
is False. Every error names the option.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import re
import shlex
import types
import typing
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Sequence, TypeVar

import yaml

from .errors import UserError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
T = TypeVar("T")


def as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip(), 10)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def as_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise UserError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return number


def as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise UserError(f"{name} must be true or false, got {value!r}")


def as_str(name: str, value) -> str:
    if isinstance(value, (dict, list)):
        raise UserError(f"{name} must be a single value, got {value!r}")
    if not str(value).strip():  # an empty path would mean the current folder
        raise UserError(f"{name} is empty; give a value or leave the option out")
    return str(value)


def as_ints(name: str, value) -> tuple[int, ...]:
    """A list of integers from YAML (`[128, 512]`) or flags (`128,512`, repeatable)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return nonempty(name, tuple(as_int(name, x) for item in items
                                for x in (str(item).split(",") if isinstance(item, str) else [item]) if str(x).strip()))


def as_strs(name: str, value) -> tuple[str, ...]:
    """A list of values from YAML or a repeated flag (paths may hold commas: never split)."""
    return nonempty(name, tuple(as_str(name, x) for x in (value if isinstance(value, (list, tuple)) else [value])))


def nonempty(name: str, values: tuple) -> tuple:
    if not values:
        raise UserError(f"{name} is an empty list; give at least one value or leave the option out")
    return values


SEEDS = 2**32  # numpy's generators take seeds below this


def parse_size(text: str) -> int:
    """Bytes of a size such as 500MB, 5GB or 2GiB (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not match:
        raise UserError(f"cannot read size {text!r}; use e.g. 500MB or 5GB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B").rstrip("I")
    return int(number * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


@contextlib.contextmanager
def named(name: str) -> Iterator[None]:
    """A UserError raised in the block names the option it is about (prefixed where it does not already)."""
    try:
        yield
    except UserError as err:
        if name in str(err):
            raise
        raise UserError(f"{name}: {err}") from err


def shard_size(name: str, text: str) -> int:
    """A largest-shard option in bytes: a readable size of at least one byte, else one line naming it."""
    with named(name):
        size = parse_size(text)
    if size < 1:
        raise UserError(f"{name} must be at least 1 byte, got {text!r}; use e.g. 500MB or 5GB")
    return size


CONVERTERS = {int: as_int, float: as_float, bool: as_bool, str: as_str,
              tuple[int, ...]: as_ints, tuple[str, ...]: as_strs}


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers an option takes (every item of a list of numbers): any of the four bounds."""

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def bounds(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def option(default: Any = None, help: str = "", choices: Sequence | None = None, factory=None,
           within: Range | None = None) -> Any:
    """A dataclass field that is an option: its default, its help text and, if fixed, its choices or
    the range of its numbers."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None,
                "bounds": within.bounds() if within else {}}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


BOUND_TESTS = {"at_least": (lambda v, b: v >= b, ">="), "above": (lambda v, b: v > b, ">"),
               "at_most": (lambda v, b: v <= b, "<="), "below": (lambda v, b: v < b, "<")}


def range_text(bounds: dict) -> str:
    """A declared range as the help and the errors say it: ">= 1", "> 0 and <= 1"."""
    return " and ".join(f"{BOUND_TESTS[k][1]} {v:g}" if isinstance(v, float) else f"{BOUND_TESTS[k][1]} {v}"
                        for k, v in bounds.items())


def check_range(name: str, value, bounds: dict) -> None:
    """value (a number, or each number of a list) within bounds, else one line naming the option."""
    if not bounds or value is None:
        return
    for item in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(item, (int, float)) and not all(BOUND_TESTS[k][0](item, b) for k, b in bounds.items()):
            raise UserError(f"{name} must be {range_text(bounds)}, got {item!r}")


def fields_of(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@functools.cache
def hints(cls) -> dict:
    """The declared type of each field of cls (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def repeatable(kind) -> bool:
    """A list of texts: a flag given once per item (a path may hold a comma, so it is never split)."""
    return tuple[str, ...] in (kind, *typing.get_args(kind))


def convert_value(cls, name: str, value):
    """value as the type field `name` of cls declares; None stays None where the field allows it."""
    hint = hints(cls)[name]
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} needs a value")
    if optional and len(args) == 2:
        hint = next(a for a in args if a is not type(None))
    converter = CONVERTERS.get(hint)
    return converter(name, value) if converter else value  # composite values (a data spec) check themselves


def typed(cls, raw: dict) -> dict:
    """raw option values as their declared types, choices and ranges checked."""
    fields = fields_of(cls)
    out = {}
    for name, value in raw.items():
        out[name] = convert_value(cls, name, value)
        choices = fields[name].metadata.get("choices")
        if choices and out[name] not in choices:
            raise UserError(f"unknown {name} {out[name]!r}; choose one of {', '.join(str(c) for c in choices if c)}")
        check_range(name, out[name], fields[name].metadata.get("bounds", {}))
    return out


def read_config(path: str | Path | None) -> dict:
    """A YAML mapping of option: value, read with one-line errors."""
    if not path:
        return {}
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.MarkedYAMLError as err:  # its own text spans several lines
        raise UserError(f"cannot read {path}: {err.problem} at line {err.problem_mark.line + 1}") from err
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from err
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(f"cannot read {path}: {err}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of option: value")
    return raw


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UserError(f"--set {text}: cannot read the value ({str(err).splitlines()[0]})") from err


def load_options(cls: type[T], config: str | Path | None = None, overrides: Sequence[str] = (),
                 flags: dict | None = None) -> T:
    """cls from its defaults < a YAML file < `--set key=value` < flags given (None = not given)."""
    from_file = read_config(config)
    raw = dict(from_file)
    raw.update(dict(parse_override(o) for o in overrides))
    raw.update({k: v for k, v in (flags or {}).items() if v is not None})
    known = fields_of(cls)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = f" in {config}" if unknown[0] in from_file else ""
        raise UserError(f"unknown option {unknown[0]!r}{where}; known: {', '.join(known)}")
    return checked(cls(**typed(cls, raw)))


def checked(options: T) -> T:
    """options after the dataclass's own rules between options (its `check()`), if it has any."""
    check = getattr(options, "check", None)
    if check is not None:
        check()
    return options


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_option_arguments(parser: argparse.ArgumentParser, cls, flags: Sequence[str], config_help: str = "") -> None:
    """`--config`, `--set` and a flag per name in flags, each help text ending in the dataclass default.
    Every option (flag or not) is listed with its default after the flags."""
    fields = fields_of(cls)
    parser.add_argument("--config", metavar="FILE",
                        help=config_help or "YAML file of options (the keys listed below); flags and --set override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="set any option listed below")
    for name in flags:
        f = fields[name]
        default = default_of(f)  # a None default is described by the help text itself ("none: ...")
        help_text = (f.metadata["help"] + ("" if default is None else f" (default {shown(default)})")
                     + described_range(f)).replace("%", "%%")
        kind = hints(cls)[name]
        if kind is bool:
            parser.add_argument(flag_name(name), dest=name, action="store_true", default=None, help=help_text)
        elif repeatable(kind):
            parser.add_argument(flag_name(name), dest=name, action="append", default=None,
                                help=f"{help_text}; repeatable")
        else:
            choices = [c for c in f.metadata["choices"] or () if c is not None] or None
            parser.add_argument(flag_name(name), dest=name, default=None, choices=choices, help=help_text)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    listing = "\n".join(f"  {name} = {shown(default_of(f))}" + (f"  {f.metadata['help']}" if f.metadata.get("help") else "")
                        + described_range(f) for name, f in fields.items())
    parser.epilog = f"options (--config keys, --set KEY=VALUE), with their defaults:\n{listing}"


def described_range(f: dataclasses.Field) -> str:
    bounds = f.metadata.get("bounds")
    return f" [{range_text(bounds)}]" if bounds else ""


def options_from_args(cls: type[T], args: argparse.Namespace, flags: Sequence[str]) -> T:
    return load_options(cls, args.config, args.set, {name: getattr(args, name) for name in flags})


def command_line(stage: str, options, flags: Sequence[str], config: str | Path | None = None,
                 keep: Sequence[str] = ()) -> str:
    """`python run.py <stage> [--config FILE] ...` that reproduces options: the values that differ
    from the defaults (or from the config file's) and those named in keep, each as a flag where the
    stage has one, else --set."""
    parts = ["python", "run.py", stage, *(["--config", str(config)] if config else [])]
    cls = type(options)
    base = cls(**typed(cls, read_config(config)))
    for name in fields_of(cls):
        value = getattr(options, name)
        if value == getattr(base, name) and name not in keep:
            continue
        if name not in flags:
            text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True,
                                  width=1 << 20).strip().removesuffix("\n...")
            parts += ["--set", f"{name}={text}"]
        elif value is True:
            parts.append(flag_name(name))
        elif repeatable(hints(cls)[name]):
            parts += [arg for item in value for arg in (flag_name(name), item)]
        else:
            parts += [flag_name(name), shown(value)]
    return shlex.join(parts)
