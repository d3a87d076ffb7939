"""Bad values found systematically (issue 33): every option of every stage, and every config.json
field the stages read, fed values of the wrong type, out of range (0, negative, huge, inf, nan) and
empty. Each is refused in one line that names it, or is a value its declaration documents as valid.

The declarations drive the walk (common/options.py's option(), common/model_config.py's FIELDS):
nothing is listed by hand here, so an option added tomorrow is walked too.
"""
import json
import math
import shutil
import types
import typing

import pytest

from common.errors import UserError
from common.model_config import FIELDS, read_config
from common.options import BOUND_TESTS, fields_of, flag_name, hints, load_options
from convert.options import ConvertOptions
from uptrain.generate import GenerateOptions
from uptrain.recipe import Recipe
from validate.options import ValidateOptions

STAGES = {"convert": ConvertOptions, "uptrain": Recipe, "validate": ValidateOptions, "generate": GenerateOptions}
REQUIRED = {ValidateOptions: {"candidate": "ckpt"}, GenerateOptions: {"out": "g.jsonl"}}  # given, as a user must
BAD = {"wrong type": ["many", [1, 2], {"a": 1}, True], "zero": [0, 0.0], "negative": [-1, -0.5],
       "huge": [10**30, 1e30], "inf": [math.inf, -math.inf], "nan": [math.nan], "empty": ["", " ", [], {}]}
NUMBERS = (int, float, tuple[int, ...], tuple[float, float])


def plain(kind):
    """The declared type without None (an optional option may be left out)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def documented(cls, name: str, value) -> bool:
    """value is one the declaration of option `name` accepts: its type, its choices, its range."""
    field, kind = fields_of(cls)[name], plain(hints(cls)[name])
    if value is None:
        return type(None) in typing.get_args(hints(cls)[name])
    if field.metadata.get("choices") and value not in field.metadata["choices"]:
        return False
    items = value if isinstance(value, tuple) else (value,)
    if kind in (int, float, tuple[int, ...]):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items)
        return numeric and all(BOUND_TESTS[k][0](v, b) for v in items for k, b in field.metadata["bounds"].items())
    if kind is str:
        return isinstance(value, str) and bool(value.strip())
    return True  # composite values (data specs, the budget, betas) are their check()'s to document


def cases():
    for stage, cls in STAGES.items():
        for name in fields_of(cls):
            for family, values in BAD.items():
                for value in values:
                    yield pytest.param(cls, name, value, id=f"{stage}-{name}-{family}-{value!r}")


@pytest.mark.parametrize("cls,name,value", cases())
def test_every_option_refuses_bad_values_by_name(cls, name, value):
    try:
        options = load_options(cls, flags={**REQUIRED.get(cls, {}), name: value})
    except UserError as err:
        message = str(err)
        assert "\n" not in message and (name in message or flag_name(name) in message), message
        return
    assert documented(cls, name, getattr(options, name)), f"{name}={value!r} was taken as {getattr(options, name)!r}"


def test_every_number_declares_its_range():
    """What makes the walk above able to fail: a number without a declared range would pass it unchecked."""
    missing = [f"{stage}.{name}" for stage, cls in STAGES.items() for name in fields_of(cls)
               if plain(hints(cls)[name]) in NUMBERS[:3] and not fields_of(cls)[name].metadata["bounds"]
               and not fields_of(cls)[name].metadata["choices"]]
    assert missing == []


# --- config.json: the fields the stages read

CONFIG_BAD = [None, "many", [1], True, 0, -1, 1.5, 10**30, 1e30, math.inf, math.nan]


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    """A Llama config.json as the tiny test sources have it."""
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "attention_bias": False}))
    return folder


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", CONFIG_BAD, ids=repr)
def test_every_config_field_refuses_bad_values_by_name(field, value, config_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(config_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    spec = FIELDS[field]
    try:
        read_config(folder)
    except UserError as err:
        assert "\n" not in str(err) and field in str(err) and str(folder) in str(err)
        return
    if value is None:
        assert spec.nullable
        return
    exact = isinstance(value, spec.kind) and (spec.kind is bool or not isinstance(value, bool))
    number = spec.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
    assert exact or number, f"{field}={value!r} was accepted"
    if spec.kind is not bool:
        assert math.isfinite(value) and all(BOUND_TESTS[k][0](value, b) for k, b in spec.bounds.items())


@pytest.mark.parametrize("argv,name", [
    (["convert", "--max-shard-size", "0"], "max_shard_size"),
    (["convert", "--calib-tokens", "0"], "calib_tokens"),
    (["uptrain", "--set", "kd_temperature=0"], "kd_temperature"),
    (["uptrain", "--set", "log_every=0"], "log_every"),
    (["validate", "--candidate", "c", "--bootstrap", "nan"], "bootstrap"),
    (["generate", "--out", "g.jsonl", "--temperature", "-inf"], "temperature"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_the_command_line_gives_the_same_one_line(argv, name, cli, capsys):
    """The walk above goes through the loader; the command line is the same loader behind argparse."""
    assert cli(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], lines
