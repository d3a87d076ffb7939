"""Option values as their types, the same way for every stage: YAML and `--set` give text or numbers.

YAML 1.1 reads ``3e-4`` (no dot) as a string and ``.inf``/``.nan`` as floats; a plan or a recipe
is read with the rules below instead, so ``lr: 3e-4`` is a number, ``seq_len: 64.5`` an error, a
non-finite number is refused, and ``dry_run: "no"`` is False.
"""
from __future__ import annotations

import math

from .errors import UserError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


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
