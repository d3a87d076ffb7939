"""An uptraining recipe: YAML, `--set` and flags -> a checked dataclass (common/options.py), before any work starts.

Defaults follow the SkipV1Former paper's uptraining recipe (AdamW 0.9/0.95, weight decay 0.1,
cosine schedule, lr 1.5e-4 for small models, no dropout). ``--set key=value`` overrides a key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import UserError
from common.data import parse_specs
from common.options import SEEDS, Range, as_float, as_int, load_options, named, option, shard_size


@dataclass
class Recipe:
    model: str | None = option(None, "the converted checkpoint to train (none: the embedded SmolLM2, unconverted)")
    source: str | None = option(None, "the unconverted source: teacher for kd, model of the control arm "
                                      "(none: the one conversion.json names)")
    data: str | dict | list = option("data/wikitext-2/valid.txt", "training text: a spec, or a list of "
                                     "{path, weight, ...} (common/data.py)")
    eval_data: str | dict | list | None = option(None, "held-out text (none: the last eval_fraction of each data source)")
    eval_fraction: float = option(0.05, "share of each data source held out for evals", within=Range(above=0, below=1))
    eval_tokens: int = option(8192, "tokens per eval", within=Range(at_least=1))
    out: str | None = option(None, "run folder (none: runs/uptrain-<model name>; the control arm adds -control)")
    token_cache: str = option(".cache/tokens", "token stores; a path every node sees for a multi-node run")
    seq_len: int = option(256, "tokens per sequence (at most the model's positions)", within=Range(at_least=2))
    micro_batch: int = option(4, "sequences per rank per forward", within=Range(at_least=1))
    grad_accum: int = option(1, "micro-batches per optimizer step", within=Range(at_least=1))
    global_batch: int | None = option(None, "if given, must equal micro_batch x grad_accum x world size", within=Range(at_least=1))
    budget: dict = option(factory=lambda: {"steps": 100}, help="one of steps, tokens or fraction_of_pretraining "
                          "(with pretraining_tokens unless the source is the embedded SmolLM2 or has a pretraining.json)")
    lr: float = option(1.5e-4, "peak learning rate (a run that diverges stops in one line)", within=Range(above=0))
    min_lr_ratio: float = option(0.1, "final learning rate / peak (cosine schedule)", within=Range(at_least=0, at_most=1))
    warmup_steps: int = option(10, "linear learning-rate warm-up steps", within=Range(at_least=0))
    warmup_share: float | None = option(None, "the warm-up as a share of the run's steps, at least one step "
                                        "(replaces warmup_steps)", within=Range(above=0, below=1))
    weight_decay: float = option(0.1, "AdamW weight decay", within=Range(at_least=0))
    betas: tuple[float, float] = option((0.9, 0.95), "AdamW betas")
    grad_clip: float = option(1.0, "gradient-norm clip (0: none)", within=Range(at_least=0))
    zero_stage: int = option(2, "DeepSpeed ZeRO stage", choices=(0, 1, 2, 3))
    offload: bool = option(False, "ZeRO offload of optimizer state to CPU memory")
    deepspeed: str | dict | None = option(None, "a DeepSpeed JSON file (or its mapping) merged over "
                                          "configs/deepspeed_zero.json; the keys this recipe sets (batch sizes, "
                                          "ZeRO stage, precision, clipping, offload) may only repeat it or say auto")
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass (the decoder "
                                            "layers', and the output layer's a chunk of tokens at a time)")
    kernels: str = option("auto", "auto: on a CUDA GPU, Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear "
                          "cross-entropy where installed and correct there (uptrain/fast_path.py); plain: PyTorch's",
                          choices=("auto", "plain"))
    precision: str = option("auto", "auto = bf16 on a GPU, fp32 on a CPU", choices=("auto", "fp32", "bf16"))
    loss: str = option("lm", "next-token loss, distillation from the source, or both", choices=("lm", "kd", "lm+kd"))
    kd_temperature: float = option(2.0, "distillation temperature", within=Range(above=0))
    kd_weight: float = option(0.5, "weight of kd in lm+kd", within=Range(at_least=0, at_most=1))
    kd_weight_end: float | None = option(None, "kd's weight in lm+kd at the last step, reached linearly from "
                                         "kd_weight (none: constant); 0 lets the student outgrow a weak teacher",
                                         within=Range(at_least=0, at_most=1))
    kd_hidden_weight: float = option(0.0, "weight of a per-layer loss towards the teacher's hidden states (the mean "
                                     "over decoder layers of the squared distance relative to the teacher's "
                                     "squared norm), added to loss kd or lm+kd; 0 = off", within=Range(at_least=0))
    warmup_new_params_steps: int = option(0, "steps that train only the layout's new parameters first", within=Range(at_least=0))
    adapting_lr_scale: float = option(1.0, "learning rate of the tensors through which converted layers adapt "
                                      "(the ones reconstruct fits), as a multiple of lr", within=Range(above=0))
    adapting_scope: str = option("attention", "what adapting_lr_scale and warmup_new_params_steps apply to: the "
                                 "attention tensors reconstruct fits, or every tensor of a converted layer",
                                 choices=("attention", "layer"))
    blend_steps: int = option(0, "progressive conversion: converted layers move from their source K/V to the "
                                 "layout's over the first N steps (0 = off; uptrain/blend.py)", within=Range(at_least=0))
    blend_schedule: str = option("linear", "how the layout's share t of the blended K/V rises to 1; switch: "
                                 "each layer takes the layout's K/V whole with probability t; layerwise: one "
                                 "layer after another, the top one first", choices=("linear", "cosine", "switch",
                                                                                   "layerwise"))
    control_arm: bool = option(False, "train the unconverted source with this recipe: the matched control")
    seed: int = option(0, "seed of the data order and the initialization", within=Range(at_least=0, below=SEEDS))
    max_skipped_steps: int = option(3, "optimizer steps skipped for overflow in a row before the run stops",
                                    within=Range(at_least=0))
    save_every: int = option(50, "steps between checkpoints (the last step always saves)", within=Range(at_least=1))
    keep_last: int = option(2, "checkpoints kept", within=Range(at_least=1))
    eval_every: int = option(50, "steps between evals (step 0 always evals)", within=Range(at_least=1))
    log_every: int = option(1, "steps between metric lines", within=Range(at_least=1))
    export_dtype: str = option("auto", "exported weights' dtype (auto: the model checkpoint's)",
                               choices=("auto", "float32", "bfloat16", "float16"))
    export_max_shard_size: str = option("5GB", "largest exported shard")
    export_at: tuple[int, ...] = option((), "steps after which the model is also exported, to exports/stepN "
                                            "(quality per compute: each one judged by validate)", within=Range(at_least=1))

    def check(self) -> None:
        self.betas = typed_betas(self.betas)
        self.budget = typed_budget(self.budget)
        for name in ("data", "eval_data"):  # a spec's shape is checked here; whether its files exist, by the run
            if getattr(self, name) is not None:
                with named(name):
                    parse_specs(getattr(self, name))
        shard_size("export_max_shard_size", self.export_max_shard_size)
        if self.deepspeed is not None:
            users_deepspeed(self.deepspeed)
        if self.kd_hidden_weight and self.loss == "lm":
            raise UserError("kd_hidden_weight distils from the source's hidden states: set loss to kd or lm+kd")


# Keys a resume may change: none of them decides the data order, the model or the optimizer.
RESUMABLE = ("out", "save_every", "keep_last", "eval_every", "log_every", "eval_tokens", "max_skipped_steps",
             "token_cache", "export_dtype", "export_max_shard_size", "export_at", "kernels")


def load_recipe(path: str | None, overrides: list[str] = (), flags: dict | None = None) -> Recipe:
    return load_options(Recipe, path, overrides, flags)


def warmup_length(recipe: Recipe, total_steps: int) -> int:
    """Warm-up steps: warmup_share of the run where given (a budget in tokens or a share of pretraining
    fixes the steps only once the batch is known), else warmup_steps."""
    if recipe.warmup_share is None:
        return recipe.warmup_steps
    return max(1, round(recipe.warmup_share * total_steps))


def users_deepspeed(spec) -> dict:
    """A user's DeepSpeed settings, as the Hugging Face Trainer and axolotl take them: the path of a
    DeepSpeed JSON file, or the mapping itself (a recipe's YAML or `--set`)."""
    if isinstance(spec, dict):
        return spec
    if not isinstance(spec, str):
        raise UserError(f"recipe key deepspeed must be the path of a DeepSpeed JSON file, got {spec!r}")
    try:
        config = json.loads(Path(spec).read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read the deepspeed config {spec}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"the deepspeed config {spec} is not UTF-8 text ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise UserError(f"the deepspeed config {spec} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise UserError(f"the deepspeed config {spec} must be a JSON object of DeepSpeed settings")
    return config


def typed_betas(betas) -> tuple[float, float]:
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise UserError(f"recipe key betas must be two numbers, e.g. [0.9, 0.95], got {betas!r}")
    typed = tuple(as_float("recipe key betas", b) for b in betas)
    if not all(0 <= b < 1 for b in typed):
        raise UserError(f"recipe key betas must be in [0, 1), got {betas!r}")
    return typed


def typed_budget(budget) -> dict:
    if not isinstance(budget, dict) or len(budget.keys() & {"tokens", "steps", "fraction_of_pretraining"}) != 1:
        raise UserError("budget must give exactly one of tokens, steps or fraction_of_pretraining")
    kinds = {"steps": as_int, "tokens": as_int, "pretraining_tokens": as_int, "fraction_of_pretraining": as_float}
    unknown = set(budget) - set(kinds)
    if unknown:
        raise UserError(f"unknown budget key {sorted(unknown)[0]!r}")
    typed = {k: kinds[k](f"budget {k}", v) for k, v in budget.items()}
    for key, value in typed.items():
        if not value > 0:
            raise UserError(f"budget {key} must be a positive number, got {budget[key]!r}")
    return typed


def as_written(recipe: Recipe) -> dict:
    """The recipe as recipe.yaml holds it (tuples become lists), to compare with a saved one."""
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe)))


def changed_keys(saved: dict, recipe: Recipe) -> list[str]:
    """Keys whose value differs from a saved recipe's, among those a resume must keep."""
    now = as_written(recipe)
    return sorted(k for k in set(now) | set(saved) if k not in RESUMABLE and saved.get(k) != now.get(k))
