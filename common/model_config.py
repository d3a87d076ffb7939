"""A model folder's config.json, read and checked before anything else trusts it.

The stages read a handful of its fields (the model's shape, its positions, its norms and RoPE);
transformers and the planner would otherwise fail deep inside on a damaged or hand-edited value
(``"hidden_size": null`` is a StrictDataclassFieldValidationError, ``"num_hidden_layers": 1e9``
a plan that never ends). Each field is declared once below with its type and range, the same way
the stages declare their options (common/options.py), and a bad value is one line naming the field.
A field left out is transformers' to default; ``null`` is allowed only where the field is optional.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .options import check_range

BIG = 1 << 24  # far above any real model's width, heads or layers; below what a plan could loop over


@dataclass(frozen=True)
class ConfigField:
    kind: type  # int, float or bool
    bounds: dict
    nullable: bool = False  # null means "derive it" (head_dim, num_key_value_heads, ...)


def _int(nullable=False, low=1, high=BIG) -> ConfigField:
    return ConfigField(int, {"at_least": low, "at_most": high}, nullable)


FIELDS = {
    "vocab_size": _int(high=1 << 32),  # token ids are stored as uint32 at most (token store)
    "hidden_size": _int(),
    "intermediate_size": _int(),
    "num_hidden_layers": _int(high=1 << 16),
    "num_attention_heads": _int(high=1 << 16),
    "num_key_value_heads": _int(nullable=True, high=1 << 16),
    "head_dim": _int(nullable=True),
    "max_position_embeddings": _int(nullable=True, high=1 << 40),
    "rms_norm_eps": ConfigField(float, {"above": 0, "below": 1}, nullable=True),
    "rope_theta": ConfigField(float, {"above": 0}, nullable=True),
    "tie_word_embeddings": ConfigField(bool, {}, nullable=True),
    "attention_bias": ConfigField(bool, {}, nullable=True),
}


def check_fields(config: dict, path: Path) -> None:
    """Every declared field config holds is of its type and in its range, and the heads divide as
    attention needs; else one line naming the field and the file."""
    for name, spec in FIELDS.items():
        if name not in config or (config[name] is None and spec.nullable):
            continue
        value = config[name]
        exact = isinstance(value, spec.kind) and not (spec.kind is not bool and isinstance(value, bool))
        number = spec.kind is float and isinstance(value, int) and not isinstance(value, bool)
        if not (exact or number):
            raise UserError(f"{path}: {name} must be {_kind_name(spec)}, got {value!r}")
        if spec.kind is float and not math.isfinite(value):  # Python's json reads NaN and Infinity
            raise UserError(f"{path}: {name} must be a finite number, got {value!r}")
        check_range(f"{path}: {name}", value, spec.bounds)
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise UserError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    hidden = config.get("hidden_size")
    if config.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise UserError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} "
                        "(and no head_dim is given)")


def _kind_name(spec: ConfigField) -> str:
    name = {int: "an integer", float: "a number", bool: "true or false"}[spec.kind]
    return f"{name} or null" if spec.nullable else name


def read_config(folder: Path) -> dict:
    """folder/config.json as a dict, its declared fields checked; one line for a missing, unreadable or bad file."""
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{folder} has no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from err
    if not isinstance(config, dict):
        raise UserError(f"{path} is not a JSON object of config fields")
    check_fields(config, path)
    return config
