"""DeepSpeed set-up: distributed init (gloo on CPU, nccl on GPU), the ZeRO config, the optimizer, and
how the process hands freed memory back."""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import socket
from pathlib import Path

import torch

from common.errors import UserError
from models.layout_tensors import adapts

from .fast_path import fused_adamw, training_device
from .recipe import Recipe, users_deepspeed, warmup_length

TEMPLATE = Path(__file__).resolve().parent.parent / "configs" / "deepspeed_zero.json"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial threshold
# Below this size of model the held memory is small and the page faults are not: a 1.3M-parameter
# Llama (width 96, 8,192-token steps, one thread) trained at 2,700-3,400 tokens/s with the threshold
# held and 4,250-4,770 without it (half its time in the kernel). Page faults per step grow with the
# activations, compute with the parameters, so the cost falls as models widen.
HOLD_THRESHOLD_FROM_PARAMS = 20_000_000


def return_freed_memory(params: int) -> None:
    """Have glibc give a freed CPU tensor's memory back to the system at once (other C libraries: no-op).

    PyTorch takes CPU tensors from malloc. glibc serves a block of 128 KiB or more with a mapping of
    its own, unmapped when freed, but each time one is freed it raises that threshold to the freed
    block's size (up to 32 MiB): after the first step most gradients and activations come from the
    heap, where freed memory stays with the process, fragmented. On the demo's uptraining of FusedKV
    SmolLM2-135M (fp32, CPU) the process then held 1.1 GB more than its live tensors after every step
    and peaked at 3.47 GB; with the threshold held at 128 KiB it holds its live tensors (2.03 GB) and
    peaks at 2.76 GB. The price is a page fault on each new tensor's pages: ~4 s more kernel time per
    1,024-token step there, next to ~50 s of compute (bench/results/demo_memory.json). Models under
    HOLD_THRESHOLD_FROM_PARAMS keep glibc's behaviour."""
    if params >= HOLD_THRESHOLD_FROM_PARAMS and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def init_distributed() -> tuple[int, int]:
    """Rank and world size; a plain `python run.py uptrain` becomes a world of one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # A world of one made here is marked with our pid: a child process (the demo's stages) inherits the
    # variables, and the port they name is still held by the parent's process group.
    pid, _, port = os.environ.get("KVSHARE_WORLD_OF_ONE", "").partition(":")
    inherited = port == os.environ.get("MASTER_PORT") and pid != str(os.getpid())
    if "RANK" not in os.environ or inherited:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          KVSHARE_WORLD_OF_ONE=f"{os.getpid()}:{port}")
    import deepspeed

    if not torch.cuda.is_available():
        skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def skip_cpu_shm_op():
    """DeepSpeed's CPU accelerator JIT-builds a shared-memory all-reduce op in init_distributed, used only
    by DeepSpeed-Inference's tensor parallelism, never by training. Every process start pays the
    build (or its up-to-date check), and torch's build lock has no owner check: a process killed
    while building (Ctrl-C, a restart, a test's kill) leaves the lock file and every later start
    waits on it forever. The op is marked unavailable, as on a machine without a compiler."""
    from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def use_bf16(recipe: Recipe) -> bool:
    return recipe.precision == "bf16" or (recipe.precision == "auto" and torch.cuda.is_available())


def merged(base: dict, over: dict) -> dict:
    """base with over's settings on top, section by section (a nested mapping merges, a value replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def recipe_settings(recipe: Recipe, world_size: int) -> dict[tuple[str, ...], tuple[object, str]]:
    """The DeepSpeed settings the recipe decides: path -> (value, the recipe key that sets it)."""
    offload = recipe.offload and recipe.zero_stage > 0
    return {
        ("train_micro_batch_size_per_gpu",): (recipe.micro_batch, "micro_batch"),
        ("gradient_accumulation_steps",): (recipe.grad_accum, "grad_accum"),
        ("train_batch_size",): (recipe.micro_batch * recipe.grad_accum * world_size,
                                f"micro_batch x grad_accum x {world_size} ranks"),
        ("gradient_clipping",): (recipe.grad_clip, "grad_clip"),
        ("zero_optimization", "stage"): (recipe.zero_stage, "zero_stage"),
        ("bf16", "enabled"): (use_bf16(recipe), "precision"),
        ("fp16", "enabled"): (False, "precision (bf16 or fp32)"),
        ("zero_optimization", "offload_optimizer", "device"): ("cpu" if offload else "none", "offload"),
    }


def ds_config(recipe: Recipe, world_size: int) -> dict:
    """configs/deepspeed_zero.json, the user's DeepSpeed JSON (recipe key deepspeed) over it, and the
    recipe's own settings over both. Where the user's file sets one of those, it must say the same
    or "auto" (as in the Hugging Face Trainer's DeepSpeed configs): a different value is refused
    in one line, so a run never trains with a batch size or ZeRO stage its recipe does not show."""
    users = users_deepspeed(recipe.deepspeed) if recipe.deepspeed is not None else {}
    where = recipe.deepspeed if isinstance(recipe.deepspeed, str) else "recipe key deepspeed"
    for section in ("optimizer", "scheduler"):
        if section in users:
            raise UserError(f"{where} sets {section!r}: the recipe owns the optimizer and its schedule (lr, betas, "
                            f"weight_decay, warmup_steps, min_lr_ratio); remove {section!r} from it")
    config = merged(json.loads(TEMPLATE.read_text()), users)
    for path, (value, key) in recipe_settings(recipe, world_size).items():
        given = users
        for part in path:
            given = given.get(part) if isinstance(given, dict) else None
        if given is not None and given != "auto" and given != value:
            raise UserError(f"{where} sets {'.'.join(path)} to {given!r} but the recipe says {value!r} ({key}); "
                            f"remove it from {where}, write \"auto\", or change the recipe")
        section = config
        for part in path[:-1]:
            section = section.setdefault(part, {})
        section[path[-1]] = value
    if config["zero_optimization"]["offload_optimizer"]["device"] == "none":  # DeepSpeed reads the section's
        del config["zero_optimization"]["offload_optimizer"]                  # presence in places: none at all
    if users:
        refused_by_deepspeed(config, where)
    return config


def refused_by_deepspeed(config: dict, where: str) -> None:
    """DeepSpeed's own check of a config (unknown or mistyped keys, bad values), as one line now rather
    than a traceback once the models are loaded."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:  # the batch sizes are the recipe's, checked above: DeepSpeed works out the total for its own world
        DeepSpeedConfig({key: value for key, value in config.items() if key != "train_batch_size"})
    except (ValidationError, ValueError, AssertionError, TypeError, KeyError) as err:
        raise UserError(f"DeepSpeed refuses the settings of {where}: {err}") from err


def warmed_up_first(name: str, config, scope: str = "attention") -> bool:
    """What warmup_new_params_steps trains alone and adapting_lr_scale scales: the tensors through
    which the converted layers adapt to their new K/V, the same ones reconstruct fits
    (models.layout_tensors.ADAPTING), or with scope "layer" every tensor of a converted layer. A
    source model (the control arm) has a config without a layout, so nothing of it is new."""
    return hasattr(config, "layer_role") and adapts(config, name, whole_layer=scope == "layer")


def optimizer_and_schedule(model, recipe: Recipe, total_steps: int):
    """AdamW with a cosine schedule; during warmup_new_params_steps only new parameters move (lr 0 elsewhere),
    and those move at adapting_lr_scale x lr throughout.

    Weight decay applies to the weights of linear layers and embeddings only, as in GPT-3, Llama and
    nanoGPT: norm weights, biases and FusedKV's gates are scales whose size is their meaning, and decay
    pulls them towards 0 with nothing in the loss asking for it. At the papers' budget the pull is
    large: weight decay 0.1 over a cosine schedule at lr 1.5e-4 and 200k steps multiplies a weight the
    loss does not defend by exp(-0.1 x 1.5e-4 x 0.55 x 2e5) = 0.19."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # not blend's source K/V
    warm_first = {name for name, _ in trained if warmed_up_first(name, model.config, recipe.adapting_scope)}
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}

    warmup = warmup_length(recipe, total_steps)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def frozen_during_warmup(step: int) -> float:
        return 0.0 if step < recipe.warmup_new_params_steps else cosine(step)

    def adapting(step: int) -> float:
        return recipe.adapting_lr_scale * cosine(step)

    groups, lambdas = [], []
    for first in (True, False):
        # with nothing new (the control arm) there is nothing to warm up alone
        schedule = adapting if first else cosine if not warm_first else frozen_during_warmup
        for decayed in (True, False):
            params = [p for name, p in trained if (name in warm_first) == first and (id(p) in matrices) == decayed]
            if params:
                groups.append({"params": params, "weight_decay": recipe.weight_decay if decayed else 0.0})
                lambdas.append(schedule)
    # fused: one kernel, no temporaries; the default (a loop over tensors on a CPU) makes two of each
    # tensor's size (the tied embedding's: 0.22 GB at SmolLM2-135M), foreach (on GPUs) of all of them
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr, betas=tuple(recipe.betas),
                                  fused=fused_adamw(str(training_device())))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
