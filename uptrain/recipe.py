"""An uptraining recipe: YAML -> validated dataclass, before any work starts.

Defaults follow the SkipV1Former paper's uptraining recipe (AdamW 0.9/0.95, weight decay 0.1,
cosine schedule, lr 1.5e-4 for small models, no dropout). ``--set key=value`` overrides a key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.errors import UserError
from common.options import as_bool, as_float, as_int


@dataclass
class Recipe:
    model: str | None = None  # converted checkpoint (None = embedded SmolLM2, unconverted)
    source: str | None = None  # the unconverted source: teacher for kd, model of the control arm
    data: str | dict | list = "data/wikitext-2/valid.txt"  # a spec, or a list of {path, weight, ...} (common/data.py)
    eval_data: str | dict | list | None = None  # default: the last eval_fraction of each `data` source
    eval_fraction: float = 0.05
    eval_tokens: int = 8192
    out: str | None = None  # run folder (default runs/uptrain-<model name>)
    token_cache: str = ".cache/tokens"  # token stores; a path every node sees for a multi-node run
    seq_len: int = 256
    micro_batch: int = 4
    grad_accum: int = 1
    global_batch: int | None = None  # if given, must equal micro_batch * grad_accum * world size
    budget: dict = field(default_factory=lambda: {"steps": 100})
    lr: float = 1.5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    zero_stage: int = 2
    offload: bool = False
    activation_checkpointing: bool = False
    precision: str = "auto"  # auto = bf16 on GPU, fp32 on CPU
    loss: str = "lm"  # lm | kd | lm+kd
    kd_temperature: float = 2.0
    kd_weight: float = 0.5  # weight of kd in lm+kd
    warmup_new_params_steps: int = 0
    control: bool = False
    seed: int = 0
    max_skipped_steps: int = 3  # optimizer steps skipped for overflow in a row before the run stops
    save_every: int = 50
    keep_last: int = 2
    eval_every: int = 50
    log_every: int = 1
    export_dtype: str = "auto"  # auto = the model checkpoint's dtype
    export_max_shard_size: str = "5GB"


INTS = ("seq_len", "micro_batch", "grad_accum", "global_batch", "eval_tokens", "warmup_steps", "zero_stage",
        "warmup_new_params_steps", "seed", "max_skipped_steps", "save_every", "keep_last", "eval_every", "log_every")
FLOATS = ("eval_fraction", "lr", "min_lr_ratio", "weight_decay", "grad_clip", "kd_temperature", "kd_weight")
BOOLS = ("offload", "activation_checkpointing", "control")
# Keys a resume may change: none of them decides the data order, the model or the optimizer.
RESUMABLE = ("out", "save_every", "keep_last", "eval_every", "log_every", "eval_tokens", "max_skipped_steps",
             "token_cache", "export_dtype", "export_max_shard_size")


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UserError(f"--set {text}: cannot read the value ({str(err).splitlines()[0]})") from err


def load_recipe(path: str | None, overrides: list[str] = ()) -> Recipe:
    raw = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise UserError(f"cannot read recipe {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise UserError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from err
        if not isinstance(raw, dict):
            raise UserError(f"recipe {path} must be a mapping of keys to values")
    raw.update(dict(_parse_override(o) for o in overrides))
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown recipe key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    recipe = Recipe(**typed(raw))
    validate(recipe)
    return recipe


def typed(raw: dict) -> dict:
    """Recipe values as their types (common/options.py: `3e-4` is a number, `64.5` no integer)."""
    out = dict(raw)
    for keys, kind in ((INTS, as_int), (FLOATS, as_float), (BOOLS, as_bool)):
        for key in keys:
            if key in out and out[key] is not None:
                out[key] = kind(f"recipe key {key}", out[key])
    if "betas" in out:
        betas = out["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise UserError(f"recipe key betas must be two numbers, e.g. [0.9, 0.95], got {betas!r}")
        out["betas"] = tuple(as_float("recipe key betas", b) for b in betas)
        if not all(0 <= b < 1 for b in out["betas"]):
            raise UserError(f"recipe key betas must be in [0, 1), got {betas!r}")
    if isinstance(out.get("budget"), dict):
        kinds = {"steps": as_int, "tokens": as_int, "pretraining_tokens": as_int, "fraction_of_pretraining": as_float}
        out["budget"] = {k: kinds[k](f"budget {k}", v) if k in kinds else v for k, v in out["budget"].items()}
    return out


def changed_keys(saved: dict, recipe: Recipe) -> list[str]:
    """Keys whose value differs from a saved recipe's, among those a resume must keep."""
    now = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe)))  # compare as written: tuples become lists
    return sorted(k for k in set(now) | set(saved) if k not in RESUMABLE and saved.get(k) != now.get(k))


def validate(r: Recipe) -> None:
    positive = {"seq_len": r.seq_len, "micro_batch": r.micro_batch, "grad_accum": r.grad_accum, "lr": r.lr,
                "save_every": r.save_every, "eval_every": r.eval_every, "keep_last": r.keep_last}
    for name, value in positive.items():
        if not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"recipe key {name} must be positive, got {value!r}")
    if r.zero_stage not in (0, 1, 2, 3):
        raise UserError(f"zero_stage must be 0, 1, 2 or 3, got {r.zero_stage!r}")
    if r.loss not in ("lm", "kd", "lm+kd"):
        raise UserError(f"loss must be lm, kd or lm+kd, got {r.loss!r}")
    if r.precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"precision must be auto, fp32 or bf16, got {r.precision!r}")
    if not isinstance(r.budget, dict) or len(r.budget.keys() & {"tokens", "steps", "fraction_of_pretraining"}) != 1:
        raise UserError("budget must give exactly one of tokens, steps or fraction_of_pretraining")
    for key in ("tokens", "steps", "fraction_of_pretraining"):
        if key in r.budget and not (isinstance(r.budget[key], (int, float)) and r.budget[key] > 0):
            raise UserError(f"budget {key} must be a positive number, got {r.budget[key]!r}")
    unknown = set(r.budget) - {"tokens", "steps", "fraction_of_pretraining", "pretraining_tokens"}
    if unknown:
        raise UserError(f"unknown budget key {sorted(unknown)[0]!r}")
    if not 0 < r.eval_fraction < 1:
        raise UserError("eval_fraction must be between 0 and 1")
    if r.export_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"export_dtype must be auto, float32, bfloat16 or float16, got {r.export_dtype!r}")
    if r.max_skipped_steps < 0:
        raise UserError(f"recipe key max_skipped_steps must be >= 0, got {r.max_skipped_steps}")
