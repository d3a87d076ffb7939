"""Progressive conversion (recipe key ``blend_steps``): converted layers start on their source K/V
and move to the layout's over the first blend_steps steps.

A conversion changes where the top layers' keys and values come from all at once, and the model
drops to the step-0 collapse before training can adapt it. With a blend, each converted layer
attends during the first N steps with

    K = (1 - t) K_source + t K_layout,    V = (1 - t) V_source + t V_layout,

where K_source, V_source are what the source layer computed (its own k_proj, v_proj and k_norm,
read from the source checkpoint, frozen) and t rises from 0 at step 0 to 1 at step N. The ``switch``
schedule mixes whole layers instead: at each step each converted layer takes the layout's K/V with
probability t and its source's otherwise, so every forward is a model that exists (some layers
converted, the rest not) and a converted layer's own path gets its full gradient, not t times it.
The ``layerwise`` schedule converts one layer at a time, the top one first, each over its own
N / (converted layers) steps, as ECHO-LLaMA (arXiv 2505.17331) converts a pretrained model: the
layers below a converting layer are still the source's, those above it already the layout's.
With the copy init (q_proj and o_proj as the source's) the model at t = 0 is the source itself;
reconstruct refits them to the layout's K/V, so with it t = 0 is not the source. From step N on
the model is exactly the layout; the source projections are then unused and never exported
(``detach`` takes them off before the export).

The projections hang under each converted attention module as its ``kv_substitute`` (the model's
K/V substitution hook; a module, so ZeRO-3 gathers them as it gathers any other, and DeepSpeed's
checkpoints hold them for a resume).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError
from models.layout_tensors import attn_key
from models.modeling_sharedkv import SharedKVAttention, head_norm, rope


@dataclass
class BlendSchedule:
    """t, the share of the layout's K/V (for ``switch``: the chance a layer takes it whole), as a
    function of the step the model is at."""

    steps: int
    shape: str = "linear"
    step: int = 0  # the trainer sets it before each step and each eval
    seed: int = 0
    layers: tuple[int, ...] = ()  # the converted layers (attach sets them): layerwise's order

    @property
    def t(self) -> float:
        x = min(1.0, self.step / self.steps)
        return 0.5 - 0.5 * math.cos(math.pi * x) if self.shape == "cosine" else x

    def share(self, layer_idx: int) -> float:
        """The layout's share of layer layer_idx's K/V at this step. A switch is drawn from (seed,
        step, layer) alone: a recomputed forward, another rank and a resumed run draw the same."""
        t = self.t
        if self.shape == "layerwise":  # the top layer first, then each one below it
            order = sorted(self.layers, reverse=True)
            return min(1.0, max(0.0, t * len(order) - order.index(layer_idx)))
        if self.shape != "switch" or t >= 1.0:
            return t
        return float(random.Random(f"{self.seed}/{self.step}/{layer_idx}").random() < t)


class SourceKV(nn.Module):
    """A converted layer's K/V substitute (``kv_substitute``) while it blends: its source layer's
    post-RoPE K/V, mixed with the layout's by the layer's share at this step."""

    def __init__(self, attn: SharedKVAttention, schedule: BlendSchedule):
        super().__init__()
        config, width = attn.config, attn.num_kv_heads * attn.head_dim
        self.head_dim = attn.head_dim
        self.k_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, width, bias=config.qkv_bias)
        self.k_norm = head_norm(config)
        self.requires_grad_(False)
        self.schedule = schedule
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None  # earlier tokens' source K/V, on a cache

    def forward(self, attn: SharedKVAttention, hidden_states, cos, sin, past_key_values, shared_kv):
        keys, values = attn.keys_values(hidden_states, cos, sin, past_key_values, shared_kv)
        share = self.schedule.share(attn.layer_idx)
        if share >= 1.0:
            return keys, values
        if isinstance(values, tuple):  # SkipV1 on a cache: its own and layer 0's value heads, in head order
            values = torch.cat(values, dim=1)
        new = hidden_states.shape[1]  # CommonKV's rotary tables cover every cached position: take the new ones
        source_keys = rope(self.k_norm(self.heads(self.k_proj(hidden_states))), cos[:, -new:], sin[:, -new:])
        source_values = self.heads(self.v_proj(hidden_states))
        if past_key_values is not None:
            source_keys, source_values = self.cached(source_keys, source_values, keys.shape[-2])
        return torch.lerp(source_keys, keys, share), torch.lerp(source_values, values, share)

    def heads(self, states: torch.Tensor) -> torch.Tensor:
        """(batch, seq, kv_heads * head_dim) -> (batch, kv_heads, seq, head_dim)."""
        return states.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)

    def cached(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The new tokens' source K/V after the earlier ones': the layer caches nothing of the
        source's, so its substitute keeps them, from the prefill (the whole length is new) on."""
        if length > keys.shape[-2]:
            if self.past is None or self.past[0].shape[-2] + keys.shape[-2] != length:
                raise RuntimeError("a blending layer decodes only on the cache its prefill started")
            keys, values = torch.cat((self.past[0], keys), dim=-2), torch.cat((self.past[1], values), dim=-2)
        self.past = (keys, values)
        return keys, values


def converted_layers(model) -> list[SharedKVAttention]:
    """The attention modules whose K/V the conversion changed (not the layout's storage layers)."""
    config = model.config
    if not hasattr(config, "layer_role"):  # a source model (the control arm): nothing converted
        return []
    return [layer.self_attn for i, layer in enumerate(model.model.layers) if config.layer_role(i) != "store"]


def attach(model, source: Path, schedule: BlendSchedule) -> int:
    """Give each converted layer its source K/V projections and blend by ``schedule``; returns how
    many layers blend (0 for a model without a layout)."""
    from checkpoint_io.source import open_source
    from common.sources import readable_location

    layers = converted_layers(model)
    if not layers:
        return 0
    schedule.layers = tuple(attn.layer_idx for attn in layers)
    root, extra = readable_location(source)  # a GGUF through its dequantized folder
    tensors = open_source(source if extra else Path(root))
    for attn in layers:
        source_kv = SourceKV(attn, schedule)
        for name, param in source_kv.named_parameters():
            key = attn_key(attn.layer_idx, name)
            if key not in tensors.shapes:
                raise UserError(f"blend_steps needs the source's {key}, and {source} has none: "
                                "set source to this checkpoint's source")
            param.data.copy_(tensors.get(key).view(param.shape))
        attn.kv_substitute = source_kv.to(next(attn.parameters()).dtype)
    return len(layers)


def layout_parameters(model) -> list[tuple[str, nn.Parameter]]:
    """The model's parameters without the blend's source projections: what an export holds."""
    return [(name, p) for name, p in model.named_parameters() if ".kv_substitute." not in name]


def detach(model) -> None:
    """Back to the plain layout: the source projections and the blend taken off every layer."""
    for attn in converted_layers(model):
        attn.kv_substitute = None
