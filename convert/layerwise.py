"""Models with one decoder layer in memory at a time, for convert's passes over calibration text.

The fits (`--init calibrated/reconstruct`) and CommonKV's budget run the source, and the target
being fitted, layer by layer over the whole calibration pool: the pool goes through layer i before
layer i+1 is read. So one layer's weights are enough: a ``LayerwiseModel`` is built on the meta
device, and ``layer(i)`` fills that layer from its weights (a checkpoint's tensors, or the
conversion plan for the target) on the fit's device and empties it again on exit. Memory is then
one layer plus the activations of the pool, not the model: what makes a model larger than RAM
(or than the GPU) fittable.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from models.layout_tensors import layer_key

SOURCE_CHUNK = 8  # calibration sequences per layer call: the pool's attention scores would not fit at once

WeightFn = Callable[[str], torch.Tensor]


class LayerwiseModel:
    """A causal LM skeleton on the meta device whose submodules are filled from `weight(name)` on demand."""

    def __init__(self, model: nn.Module, weight: WeightFn, device: torch.device | str):
        self.model = model.float()
        self.config = model.config
        self.weight = weight
        self.device = torch.device(device)
        rotary = model.model.rotary_emb  # computed buffers, not weights: rebuilt for real on the device
        model.model.rotary_emb = type(rotary)(config=model.config).to(self.device)
        self.filled_now = self.most_filled = 0  # submodules filled at once, now and at most (tests check the bound)
        self.peak_resident = 0  # most parameters ever filled at once

    @classmethod
    def build(cls, make: Callable[[], nn.Module], weight: WeightFn, device: torch.device | str) -> LayerwiseModel:
        """make() run on the meta device: no memory for weights until a submodule is filled."""
        with torch.device("meta"):
            model = make()
        return cls(model, weight, device)

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @contextlib.contextmanager
    def filled(self, name: str) -> Iterator[nn.Module]:
        """The submodule `name` (e.g. 'model.layers.3') with its weights, emptied again afterwards."""
        module = self.model.get_submodule(name)
        module.to_empty(device=self.device)
        self.filled_now += 1
        self.most_filled = max(self.most_filled, self.filled_now)
        try:
            with torch.no_grad():
                for key, tensor in module.state_dict(keep_vars=True).items():
                    value = self.weight(f"{name}.{key}")
                    if value.shape != tensor.shape:  # copy_ would broadcast a wrong shape silently
                        raise ValueError(f"{name}.{key} is {list(value.shape)}, the model needs {list(tensor.shape)}")
                    tensor.copy_(value)
            resident = sum(p.numel() for p in self.model.parameters() if not p.is_meta)
            self.peak_resident = max(self.peak_resident, resident)
            yield module
        finally:
            module.to("meta")
            self.filled_now -= 1

    def layer(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        return self.filled(layer_key(index))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.filled("model.embed_tokens") as embed_tokens:
            return embed_tokens(ids)


@dataclass
class PoolContext:
    """What every decoder layer call over the pool needs besides its input: positions, rotary
    tables and the causal mask (one sequence's mask broadcasts over any batch of the pool)."""

    positions: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor | None


def pool_context(model: LayerwiseModel, embeds: torch.Tensor) -> PoolContext:
    from transformers.masking_utils import create_causal_mask  # here: convert's copy path never needs it

    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    rope = model.model.model.rotary_emb(embeds[:1], position_ids=positions)
    mask = create_causal_mask(config=model.config, inputs_embeds=embeds[:1], attention_mask=None,
                              past_key_values=None, position_ids=positions)
    return PoolContext(positions, rope, mask)


def call_layer(layer: nn.Module, hidden: torch.Tensor, ctx: PoolContext, **kwargs) -> torch.Tensor:
    return layer(hidden, attention_mask=ctx.mask, position_embeddings=ctx.rope, position_ids=ctx.positions,
                 use_cache=False, **kwargs)


@dataclass
class LayerPass:
    """One source layer's pass over the pool, as run_source hands it to its visitor."""

    index: int
    layer: nn.Module  # filled: its weights are there during the visit
    input: torch.Tensor  # (pool, seq, hidden), like the two below
    attention: torch.Tensor  # the attention block's output (before the residual add)
    output: torch.Tensor
    ctx: PoolContext


@torch.no_grad()
def run_source(model: LayerwiseModel, ids: torch.Tensor, visit: Callable[[LayerPass], None]) -> None:
    """The calibration pool (batch, seq) through the source's decoder, one layer resident at a
    time, SOURCE_CHUNK sequences per call; visit sees every layer's input and outputs."""
    hidden = model.embed(ids)
    ctx = pool_context(model, hidden)
    for i in range(model.num_layers):
        with model.layer(i) as layer:
            attention, out = torch.empty_like(hidden), torch.empty_like(hidden)
            rows = slice(0, 0)

            def keep_attention(module, args, output) -> None:  # returns None: the layer's output stays as it is
                attention[rows].copy_(output[0])

            hook = layer.self_attn.register_forward_hook(keep_attention)
            try:
                for start in range(0, len(ids), SOURCE_CHUNK):
                    rows = slice(start, start + SOURCE_CHUNK)
                    out[rows] = call_layer(layer, hidden[rows], ctx)
            finally:
                hook.remove()
            visit(LayerPass(i, layer, hidden, attention, out, ctx))
        hidden = out
