"""From a source checkpoint's config to its shared-KV config: which sources convert (screening), and
the layout choices a conversion makes that a loaded checkpoint only reads back (CommonKV's ranks).

Conversion code: checkpoints do not ship it (``MODEL_CODE_FILES``), as they do not ship
``layout_tensors.py``; the shipped ``kv_layout.py`` keeps only what a loaded model needs. Plain
Python: a copy conversion plans with it without importing transformers or torch.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .kv_layout import KVLayout

if TYPE_CHECKING:
    from .configuration_sharedkv import SharedKVConfig

SUPPORTED_SOURCE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# What a family's attention adds to Llama's, as the layout fields that say so: Qwen2 has biases on
# q/k/v but not on o (Llama's attention_bias covers all four), Qwen3 a per-head RMSNorm of queries
# and keys before RoPE.
FAMILY_FIELDS = {"qwen2": {"qkv_bias": True, "attention_bias": False}, "qwen3": {"qk_norm": True}}
MIXTURE_OF_EXPERTS_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# RoPE variants transformers' Llama rotary embedding computes (rope_parameters' rope_type); each
# keeps every pair (j, j + head_dim/2) rotating together, which FusedKV's key gates rely on.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# source config keys that describe the source file, not the model
NOT_MODEL_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "quantization_config",
                    "torch_dtype", "dtype")


def source_fields(fields: dict, model_type: str | None) -> dict:
    """A supported source config's fields (a dict) as the shared-KV config takes them: everything
    that describes the model kept (RoPE scaling included), sliding windows and RoPE variants Llama's
    rotary embedding lacks refused, the family's attention extras made explicit (FAMILY_FIELDS)."""
    supported = ", ".join(SUPPORTED_SOURCE_TYPES)
    if model_type in MIXTURE_OF_EXPERTS_TYPES:
        raise ValueError(f"mixture-of-experts sources ({model_type}) are not supported; supported: {supported}")
    if model_type not in SUPPORTED_SOURCE_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {supported}")
    if "kv_layout" in fields:  # a converted checkpoint says "llama" too (MODEL_TYPE)
        raise ValueError(f"this checkpoint is already converted ({fields['kv_layout']}); convert its source instead")
    fields = {k: v for k, v in fields.items() if k not in NOT_MODEL_FIELDS}
    if model_type == "mistral" and fields.get("sliding_window") is not None:
        raise ValueError("Mistral with a sliding window is not supported (set sliding_window to null)")
    if fields.get("use_sliding_window"):
        raise ValueError(f"{model_type} with use_sliding_window=true (sliding-window attention) is not supported")
    # a config.json older than transformers 5 names it rope_scaling; the config class reads both
    rope = fields.get("rope_parameters") or fields.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    fields.update(FAMILY_FIELDS.get(model_type, {}))
    fields.pop("layer_types", None)  # sliding layers are refused above, so all layers are full attention
    fields.pop("sliding_window", None)
    if fields.get("head_dim") is None:
        fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return fields


def shared_kv_config(source_config, kv_layout: str, **layout_kwargs) -> SharedKVConfig:
    """The layout's config from a supported source config (transformers'), keeping every source
    field; CommonKV's ranks uniform unless given (ValueError on a source that does not convert)."""
    from .configuration_sharedkv import SharedKVConfig

    model_type = getattr(source_config, "model_type", None)
    fields = source_fields(source_config.to_dict(), model_type)
    return with_default_ranks(SharedKVConfig(kv_layout=kv_layout, source_model_type=model_type, **fields,
                                             **layout_kwargs))


def with_default_ranks(layout: KVLayout) -> KVLayout:
    """layout with CommonKV's ranks, where none were chosen, spread evenly over the layers: what a
    conversion keeps without calibration (convert/commonkv.py sets them from similarity). Every
    layout gets them, as every converted config.json has carried them."""
    if layout.commonkv_ranks is None:
        layout.commonkv_ranks = allocate_ranks(layout.commonkv_budget, [len(g) for g in layout.commonkv_groups],
                                               layout.commonkv_rank_caps)
    return layout


def allocate_ranks(budget: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split an integer budget in proportion to weights, every share in 1..its cap.

    One unit each is set aside first; the rest is water-filled: shares that reach their cap are
    fixed there and what is left is split again among the others. Integers by largest remainder,
    so the shares sum to the budget clipped to [len(caps), sum(caps)].
    """
    n = len(caps)
    budget = max(n, min(int(budget), sum(caps)))
    room = [c - 1 for c in caps]
    shares = [0.0] * n
    free, left = [i for i in range(n) if room[i] > 0], float(budget - n)
    while free:
        total = sum(weights[i] for i in free)
        share = {i: left * weights[i] / total for i in free}
        capped = [i for i in free if share[i] >= room[i]]
        for i in capped or free:
            shares[i] = float(room[i]) if capped else share[i]
        if not capped:
            break
        left -= sum(room[i] for i in capped)
        free = [i for i in free if i not in capped]
    ranks = [1 + math.floor(s) for s in shares]
    by_remainder = sorted(range(n), key=lambda i: math.floor(shares[i]) - shares[i])
    for i in by_remainder[: budget - sum(ranks)]:
        ranks[i] += 1
    return ranks
