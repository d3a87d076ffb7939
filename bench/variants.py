"""Benchmark variants of FusedKV's attention, given to one model at a time through the model's K/V
substitution hook (``SharedKVAttention.kv_substitute``).

A benchmark layout name is a layout with variant suffixes, e.g. ``fusedkv_compiled_fuse_first``:

* ``_fuse_first``: a decode step builds the fused K/V and attends to it as a prefill does, instead
  of ``FusedAttention.decode_step``: what decode_step saves. (Any substitute turns decode_step off:
  a substitute hands attention whole K/V.)
* ``_compiled``: the fusion compiled into one kernel (``torch.compile``; Triton on a GPU), every
  call through it, decode steps included (so it fuses first too).

``with_variants`` sets the substitute on the FusedKV layers of the model it is given; the model
classes, and every other model in the process, stay as they are.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from models.modeling_sharedkv import FusedAttention


@functools.cache
def compiled_fuse():
    """FusedAttention.fuse compiled once per process, on first use (compiling takes seconds)."""
    return torch.compile(FusedAttention.fuse, dynamic=True)


class FuseFirst(nn.Module):
    """The layer's own fused K/V, built at every call, decode steps included."""

    def forward(self, attn: FusedAttention, hidden_states, cos, sin, past_key_values, shared_kv):
        return attn.keys_values(hidden_states, cos, sin, past_key_values, shared_kv)


class CompiledFusion(FuseFirst):
    """The fused K/V through the compiled fusion."""

    def forward(self, attn: FusedAttention, hidden_states, cos, sin, past_key_values, shared_kv):
        (k0, v0), (km, vm) = shared_kv[0], shared_kv[attn.middle]
        return compiled_fuse()(k0, km, v0, vm, *attn.gates(k0.dtype))


VARIANTS: dict[str, type[FuseFirst]] = {"_compiled": CompiledFusion, "_fuse_first": FuseFirst}


def split_variants(name: str) -> tuple[str, list[type[FuseFirst]]]:
    """('fusedkv', [CompiledFusion, FuseFirst]) for 'fusedkv_compiled_fuse_first'; a plain layout has none."""
    variants = []
    while suffix := next((s for s in VARIANTS if name.endswith(s)), None):
        name = name.removesuffix(suffix)
        variants.insert(0, VARIANTS[suffix])
    return name, variants


def with_variants(model: nn.Module, variants: list[type[FuseFirst]]) -> nn.Module:
    """The model with every FusedKV layer's K/V from the variants' substitute (compiled wins: it
    fuses first as well)."""
    if variants:
        substitute = CompiledFusion if CompiledFusion in variants else FuseFirst
        for module in model.modules():
            if isinstance(module, FusedAttention):
                module.kv_substitute = substitute()
    return model
