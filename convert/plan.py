"""The conversion plan: every target tensor, where it comes from and by which rule.

Built and checked before a byte is written (mergekit style); ``--dry-run`` prints it, the
writer executes it, and ``conversion.json`` saves it. Which tensors the converted checkpoint
holds, and which of them a layout keeps, changes or adds, is ``models/layout_tensors.py``'s
answer; the plan says how each is made. Rules:

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

from checkpoint_io.dtypes import safetensors_name, tensor_bytes
from checkpoint_io.source import TensorSource
from common.errors import UserError
from models.kv_layout import FUSED_GATE_INIT, LAYOUT_FIELDS, KVLayout
from models.source_layout import with_default_ranks
from models.layout_tensors import LayerTensors, attn_name, layer_tensors, source_shapes, target_shapes

if TYPE_CHECKING:
    import torch


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
        with_default_ranks(self)

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


def check_source(source: TensorSource, cfg: TargetConfig) -> None:
    for key, shape in source_shapes(cfg).items():
        if key not in source.shapes:
            raise UserError(f"source tensor {key} is missing (the config says it must exist)")
        if tuple(source.shapes[key]) != shape:
            raise UserError(f"source tensor {key} has shape {list(source.shapes[key])}, the config implies {list(shape)}")


def skipv1_partners(own: list[int], kv_heads: int) -> list[int | None]:
    """Own head j stands for reused head j' (own and reused heads paired in ascending order)."""
    reused = [h for h in range(kv_heads) if h not in own]
    return [reused[j] if j < len(reused) else None for j in range(len(own))]


def build_plan(source: TensorSource, cfg: TargetConfig, skipv1_init: str = "mean") -> Plan:
    """One mapping per tensor of the converted checkpoint, as models.layout_tensors lists them."""
    check_source(source, cfg)
    layers = [layer_tensors(cfg, i) for i in range(cfg.num_hidden_layers)]
    mappings = [_mapping(cfg, layers, key, shape, skipv1_init) for key, shape in target_shapes(cfg).items()]
    used = {m.source for m in mappings if m.source} | {key for m in mappings for key in m.args.get("sources", ())}
    dropped = sorted(k for k in source.keys() if k not in used)
    return Plan(cfg, mappings, dropped)


def _mapping(cfg: TargetConfig, layers: list[LayerTensors], key: str, shape: tuple[int, ...], skipv1_init: str) -> Mapping:
    """A kept tensor is copied, a changed one (SkipV1's own value heads) cut from its source tensor,
    an added one filled (FusedKV's gates) or factored (CommonKV)."""
    where = attn_name(key)
    if where is None or where[1] in layers[where[0]].kept:
        return Mapping(key, "copy", shape, key)
    layer, name = where
    if name in layers[layer].changed:
        own = cfg.skipv1_own_heads[layer]
        partners = skipv1_partners(own, cfg.num_key_value_heads) if skipv1_init == "mean" else None
        return Mapping(key, "heads", shape, key, {"own": own, "partners": partners})
    if name in FUSED_GATE_INIT:
        return Mapping(key, "fill", shape, None, {"value": FUSED_GATE_INIT[name]})
    from . import commonkv

    group = cfg.commonkv_group(layer)
    args = {"group": group, "rank": cfg.commonkv_ranks[group], "sources": commonkv.source_keys(cfg, group)}
    return Mapping(key, "svd", shape, None, args)


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
