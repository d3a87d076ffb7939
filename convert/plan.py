"""The conversion plan: every target tensor, where it comes from and by which rule.

Built and checked before a byte is written (mergekit style); ``--dry-run`` prints it, the
writer executes it, and ``conversion.json`` saves it. Rules:

* ``copy``       target = source tensor
* ``fill``       a new tensor of a constant (FusedKV gates at their copy initialization)
* ``heads``      SkipV1 own-head rows of v_proj: ``own`` heads, each averaged with its ``partner``
                 head (the reused head it stands for) when ``mean`` is set ("mean V" init)
* ``svd``        CommonKV factors of one group's stacked k/v weights (``convert/commonkv.py``):
                 the anchor's kv_down, each layer's kv_up and its bias (the k/v biases)
* ``fitted``     computed by a calibrated or reconstruct fit (kept in memory until written)

Source tensors that no target uses are listed as dropped.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from common.errors import UserError
from models.kv_layout import LAYOUT_FIELDS, KVLayout

from .source import TensorSource, safetensors_name, tensor_bytes

if TYPE_CHECKING:
    import torch

FUSED_GATE_INIT = {"key_gate_bottom": 0.0, "key_gate_middle": 1.0, "value_gate_bottom": 1.0, "value_gate_middle": 0.0}
# Source attention tensors a layer of each role does without: top layers read other layers' K/V
# (keys already normalized), CommonKV rebuilds K/V from a latent and keeps k_norm for the rebuilt keys.
DROPPED = {"fused": ("k_proj", "v_proj", "k_norm"), "lite": ("k_proj", "v_proj", "k_norm"),
           "commonkv": ("k_proj", "v_proj")}


class TargetConfig(KVLayout):
    """The converted model's config as plain attributes: the source's fields plus the layout's,
    what the plan, the report and config.json need. transformers' SharedKVConfig takes the same
    fields (``model_config``) where a model is built; building this one imports nothing. Fields
    the plan reads that a source may leave out take LlamaConfig's defaults, as SharedKVConfig's do
    (tests/test_convert.py checks them against it)."""

    attention_bias = False
    mlp_bias = False
    tie_word_embeddings = False

    def __init__(self, **fields):
        layout = {name: fields.pop(name) for name in LAYOUT_FIELDS if name in fields}
        self.source_fields = fields
        vars(self).update(fields)
        self.set_layout(**layout)

    def to_dict(self) -> dict:
        return {**self.source_fields, **self.layout_fields()}

    def replace(self, **layout) -> TargetConfig:
        """The same config with some layout fields changed."""
        return TargetConfig(**{**self.to_dict(), **layout})

    def model_config(self):
        """As transformers' SharedKVConfig, to build the model."""
        from models import SharedKVConfig

        return SharedKVConfig(**self.to_dict())


@dataclass
class Mapping:
    target: str
    rule: str
    shape: tuple[int, ...]
    source: str | None = None
    args: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"target": self.target, "rule": self.rule, "source": self.source, "shape": list(self.shape), **self.args}


@dataclass
class Plan:
    config: TargetConfig
    mappings: list[Mapping]
    dropped: list[str]
    fitted: dict[str, torch.Tensor] = field(default_factory=dict)
    # the factors of the CommonKV group last factored: the writer asks for a group's tensors in a row
    svd_memo: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def param_count(self) -> int:
        return sum(math.prod(m.shape) for m in self.mappings)


def expected_source_shapes(cfg: KVLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama/Mistral/Qwen2/Qwen3 checkpoint of this config must hold, with its shape."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        for name, shape in attn.items():
            shapes[f"{p}self_attn.{name}.weight"] = shape
            has_bias = cfg.attention_bias if name == "o_proj" else cfg.qkv_bias
            if has_bias:
                shapes[f"{p}self_attn.{name}.bias"] = shape[:1]
        if cfg.qk_norm:
            shapes[f"{p}self_attn.q_norm.weight"] = shapes[f"{p}self_attn.k_norm.weight"] = (d,)
        for name, shape in {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}.items():
            shapes[f"{p}mlp.{name}.weight"] = shape
            if cfg.mlp_bias:
                shapes[f"{p}mlp.{name}.bias"] = shape[:1]
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    return shapes


def check_source(source: TensorSource, cfg: TargetConfig) -> dict[str, tuple[int, ...]]:
    expected = expected_source_shapes(cfg)
    for key, shape in expected.items():
        if key not in source.shapes:
            raise UserError(f"source tensor {key} is missing (the config says it must exist)")
        if tuple(source.shapes[key]) != shape:
            raise UserError(f"source tensor {key} has shape {list(source.shapes[key])}, the config implies {list(shape)}")
    return expected


def skipv1_partners(own: list[int], kv_heads: int) -> list[int | None]:
    """Own head j stands for reused head j' (own and reused heads paired in ascending order)."""
    reused = [h for h in range(kv_heads) if h not in own]
    return [reused[j] if j < len(reused) else None for j in range(len(own))]


def build_plan(source: TensorSource, cfg: TargetConfig, skipv1_init: str = "mean") -> Plan:
    expected = check_source(source, cfg)
    mappings: list[Mapping] = []
    used: set[str] = set()
    for key, shape in expected.items():
        parts = key.split(".")
        if len(parts) > 4 and parts[3] == "self_attn":
            layer, proj = int(parts[2]), parts[4]
            role = cfg.layer_role(layer)
            if proj in DROPPED.get(role, ()):
                continue
            if role == "skipv1" and proj == "v_proj":
                own = cfg.skipv1_own_heads[layer]
                args = {"own": own, "partners": skipv1_partners(own, cfg.num_key_value_heads) if skipv1_init == "mean" else None}
                mappings.append(Mapping(key, "heads", (len(own) * cfg.head_dim, *shape[1:]), key, args))
                used.add(key)
                continue
        mappings.append(Mapping(key, "copy", shape, key))
        used.add(key)
    for layer in range(cfg.num_hidden_layers):
        if cfg.layer_role(layer) == "fused":
            for name, value in FUSED_GATE_INIT.items():
                width = cfg.head_dim // 2 if name.startswith("key") else cfg.head_dim
                target = f"model.layers.{layer}.self_attn.{name}"
                mappings.append(Mapping(target, "fill", (cfg.num_key_value_heads, width), None, {"value": value}))
    if cfg.kv_layout == "commonkv":
        from . import commonkv

        for group in range(len(cfg.commonkv_groups)):
            sources = commonkv.source_keys(cfg, group)
            used.update(sources)
            args = {"group": group, "rank": cfg.commonkv_ranks[group], "sources": sources}
            mappings += [Mapping(target, "svd", shape, None, args) for target, shape in commonkv.target_shapes(cfg, group).items()]
    dropped = sorted(k for k in source.keys() if k not in used)
    return Plan(cfg, mappings, dropped)


def materialize(plan: Plan, source: TensorSource, mapping: Mapping) -> torch.Tensor:
    """Compute one target tensor from its rule (reads one source tensor; svd reads its group's k/v)."""
    import torch

    if mapping.target in plan.fitted:
        return plan.fitted[mapping.target]
    if mapping.rule == "copy":
        return source.get(mapping.source)
    if mapping.rule == "fill":
        return torch.from_numpy(_filled(mapping))
    if mapping.rule == "heads":
        d = plan.config.head_dim
        heads = source.get(mapping.source).unflatten(0, (-1, d))
        own = heads[mapping.args["own"]]
        partners = mapping.args["partners"]
        if partners:
            mixed = [(heads[o] + heads[p]) / 2 if p is not None else heads[o] for o, p in zip(mapping.args["own"], partners)]
            own = torch.stack(mixed) if mixed else own
        return own.flatten(0, 1)
    if mapping.rule == "svd":
        from . import commonkv

        group = mapping.args["group"]
        if group not in plan.svd_memo:
            plan.svd_memo.clear()
            plan.svd_memo[group] = commonkv.group_factors(source.get, plan.config, group)
        return plan.svd_memo[group][mapping.target]
    raise ValueError(f"unknown rule {mapping.rule}")


def _filled(mapping: Mapping) -> np.ndarray:
    """A fill rule's tensor: its constant in float32."""
    return np.full(mapping.shape, mapping.args["value"], dtype=np.float32)


def stream(plan: Plan, source: TensorSource, mapping: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """One target tensor as (dtype, raw bytes) pieces in order, computed whole. `run.py convert`
    asks this only for the rules other than copy, which are small (gates, one layer's v_proj, one
    CommonKV group's factors, fitted tensors already in memory); copies go to the writer piece by
    piece from the source scan. A gate fill needs no torch."""
    if mapping.rule == "fill":
        yield "F32", _filled(mapping).reshape(-1).view(np.uint8)
        return
    tensor = materialize(plan, source, mapping)
    if tuple(tensor.shape) != tuple(mapping.shape):
        raise ValueError(f"rule {mapping.rule} made {mapping.target} {list(tensor.shape)}, the plan says {list(mapping.shape)}")
    yield safetensors_name(tensor.dtype), tensor_bytes(tensor)


def mark_fitted(plan: Plan, tensors: dict[str, torch.Tensor]) -> None:
    """Tensors produced by a fit replace their rule's output; the manifest records the rule as fitted."""
    for mapping in plan.mappings:
        if mapping.target in tensors:
            plan.fitted[mapping.target] = tensors[mapping.target].detach().to("cpu", copy=True)  # fits may run on a GPU
            if mapping.rule != "fitted":  # a second fit (reconstruct after calibrated) keeps the first rule
                mapping.args = {**mapping.args, "initial_rule": mapping.rule}
                mapping.rule = "fitted"
