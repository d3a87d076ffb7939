"""The compute budget: tokens, steps, or a fraction of the source's pretraining compute."""
from __future__ import annotations

import math
from dataclasses import dataclass

# SmolLM2-135M's model card: pretrained on 2T tokens. Used when the source is the embedded model.
SMOLLM2_135M_PRETRAINING_TOKENS = 2_000_000_000_000


@dataclass
class Budget:
    steps: int
    tokens: int
    flops: float
    fraction_of_pretraining: float | None


def resolve_budget(budget: dict, tokens_per_step: int, params: int, source_params: int,
                   default_pretraining_tokens: int | None) -> Budget:
    """Steps to run; FLOPs as 6 * params * tokens, compared with 6 * source params * pretraining tokens."""
    pretraining_tokens = budget.get("pretraining_tokens", default_pretraining_tokens)
    if "steps" in budget:
        steps = int(budget["steps"])
    elif "tokens" in budget:
        steps = math.ceil(budget["tokens"] / tokens_per_step)
    else:
        if not pretraining_tokens:
            from common.errors import UserError

            raise UserError("budget fraction_of_pretraining needs pretraining_tokens (the source's pretraining tokens)")
        pretraining_flops = 6 * source_params * pretraining_tokens
        steps = math.ceil(budget["fraction_of_pretraining"] * pretraining_flops / (6 * params * tokens_per_step))
    tokens = steps * tokens_per_step
    flops = 6.0 * params * tokens
    fraction = flops / (6.0 * source_params * pretraining_tokens) if pretraining_tokens else None
    return Budget(steps=steps, tokens=tokens, flops=flops, fraction_of_pretraining=fraction)
