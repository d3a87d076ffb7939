"""Benchmark variants of FusedKV's attention, as subclasses given to one model at a time.

A benchmark layout name is a layout with variant suffixes, e.g. ``fusedkv_compiled_fuse_first``:

* ``_compiled``: the fusion compiled into one kernel (``torch.compile``; Triton on a GPU);
* ``_fuse_first``: a decode step builds the fused K/V and attends to it as a prefill does, instead
  of ``FusedAttention.decode_step``: what decode_step saves.

``with_variants`` re-classes the FusedKV attention modules of the model it is given; the model
classes, and every other model in the process, stay as they are.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from models.modeling_sharedkv import FusedAttention, SharedKVAttention


@functools.cache
def compiled_fuse():
    """FusedAttention.fuse compiled once per process, on first use (compiling takes seconds)."""
    return torch.compile(FusedAttention.fuse, dynamic=True)


class CompiledFusion(FusedAttention):
    @staticmethod
    def fuse(*caches_and_gates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return compiled_fuse()(*caches_and_gates)


class FuseFirst(FusedAttention):
    def forward(self, *args, **kwargs):
        return SharedKVAttention.forward(self, *args, **kwargs)  # every call through keys_values, as a prefill


VARIANTS: dict[str, type[FusedAttention]] = {"_compiled": CompiledFusion, "_fuse_first": FuseFirst}


def split_variants(name: str) -> tuple[str, list[type[FusedAttention]]]:
    """('fusedkv', [CompiledFusion, FuseFirst]) for 'fusedkv_compiled_fuse_first'; a plain layout has none."""
    variants = []
    while suffix := next((s for s in VARIANTS if name.endswith(s)), None):
        name = name.removesuffix(suffix)
        variants.insert(0, VARIANTS[suffix])
    return name, variants


def with_variants(model: nn.Module, variants: list[type[FusedAttention]]) -> nn.Module:
    """The model with its FusedKV attention modules of every variant at once (they add no state, so
    re-classing the built modules is all it takes)."""
    if variants:
        cls = variants[0] if len(variants) == 1 else type("".join(v.__name__ for v in variants), tuple(variants), {})
        for module in model.modules():
            if type(module) is FusedAttention:
                module.__class__ = cls
    return model
