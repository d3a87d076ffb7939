"""`--init reconstruct`: fit each changed layer so it reproduces its source layer on calibration text.

A converted layer (FusedKV/Lite top layer, SkipV1 layer >= 1) starts from the source weights
but attends to other layers' K/V, so at step 0 it computes something else. Here each such layer
is trained alone, for a few hundred Adam steps, on the source's own activations:

* ``independent``: the layer sees the source's input hidden states and must reproduce the
  source attention output (normalized MSE). Layers are independent of each other.
* ``sequential`` (default): layers are fitted bottom-up; each sees the hidden states produced by
  the already-converted layers below it, and its attention output must bring the residual
  stream back to where the source's was, so errors of lower layers are corrected instead of
  compounding.

Only the layer being fitted trains (its gates, q_proj, o_proj and, for SkipV1, its own-head
v_proj); everything else is frozen. Activations of one layer at a time are resident besides the
source hidden states (layers x tokens x hidden floats: 30 x 2048 x 576 x 4 B = 141 MB for SmolLM2).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from common.console import progress

FITTED_PARAMS = {
    "fused": ("q_proj", "o_proj", "key_gate_bottom", "key_gate_middle", "value_gate_bottom", "value_gate_middle"),
    "lite": ("q_proj", "o_proj"),
    "skipv1": ("q_proj", "v_proj", "o_proj"),
}


@dataclass
class LayerFit:
    layer: int
    role: str
    error_before: float
    error_after: float


@dataclass
class ReconstructOptions:
    steps: int = 150
    lr: float = 5e-4
    mode: str = "sequential"  # or "independent"
    seed: int = 0


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum() / scale


@torch.no_grad()
def source_activations(source: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states entering every source layer (plus the last output) and every attention output."""
    hidden, attn_out, hooks = [], [], []
    for layer in source.model.layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kw: hidden.append(args[0] if args else kw["hidden_states"]), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, args, out: attn_out.append(out[0])))
        last = layer
    hooks.append(last.register_forward_hook(lambda m, args, out: hidden.append(out[0] if isinstance(out, tuple) else out)))
    try:
        source(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return hidden, attn_out


def _layer_forward(model: nn.Module, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
    return model.model.layers[index](hidden, attention_mask=ctx["mask"], position_embeddings=ctx["rope"],
                                     position_ids=ctx["positions"], shared_kv=ctx["shared_kv"], use_cache=False)


def _attention(model: nn.Module, index: int, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
    layer = model.model.layers[index]
    out, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=ctx["rope"],
                             attention_mask=ctx["mask"], shared_kv=ctx["shared_kv"])
    return out


def reconstruct(source: nn.Module, target: nn.Module, ids: torch.Tensor,
                options: ReconstructOptions = ReconstructOptions()) -> list[LayerFit]:
    """Fit target's changed layers in place against source on token ids (batch, seq); returns per-layer errors."""
    if options.mode not in ("sequential", "independent"):
        raise ValueError(f"unknown reconstruct mode {options.mode!r}")
    torch.manual_seed(options.seed)
    config = target.config
    src_hidden, src_attn = source_activations(source, ids)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)

    positions = torch.arange(ids.shape[1])[None]
    embeds = target.model.embed_tokens(ids)
    ctx = {
        "positions": positions,
        "rope": target.model.rotary_emb(embeds, position_ids=positions),
        "mask": create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                   past_key_values=None, position_ids=positions),
        "shared_kv": {},
    }
    changed = [i for i in range(config.num_hidden_layers) if config.layer_role(i) != "store"]
    fits: list[LayerFit] = []
    hidden = embeds
    with progress() as bar:
        task = bar.add_task(f"reconstruct ({options.mode})", total=len(changed) * options.steps)
        for i in range(config.num_hidden_layers):
            role = config.layer_role(i)
            layer_input = hidden if options.mode == "sequential" else src_hidden[i]
            if role != "store":
                fits.append(_fit_layer(target, i, role, layer_input, src_hidden, src_attn, ctx, options, bar, task))
            with torch.no_grad():  # storage layers publish their K/V into ctx["shared_kv"] here
                hidden = _layer_forward(target, i, layer_input, ctx)
    for p in target.parameters():
        p.requires_grad_(True)
    return fits


def _fit_layer(target, i, role, layer_input, src_hidden, src_attn, ctx, options, bar, task) -> LayerFit:
    attn = target.model.layers[i].self_attn
    params = [p for name, p in attn.named_parameters() if name.split(".")[0] in FITTED_PARAMS[role]]
    for p in params:
        p.requires_grad_(True)
    # Both modes fit the attention output; sequential mode also asks it to cancel the drift that
    # the converted layers below left in its input, so the residual stream after this attention
    # lands where the source's did: h_conv + attn(h_conv) = h_src + attn_src.
    target_out = src_attn[i] + (src_hidden[i] - layer_input if options.mode == "sequential" else 0)
    scale = src_attn[i].pow(2).sum()

    def predict() -> torch.Tensor:
        return _attention(target, i, layer_input, ctx)

    with torch.no_grad():
        before = normalized_mse(predict(), target_out, scale).item()
    optimizer = torch.optim.Adam(params, lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)
    initial = [p.detach().clone() for p in params]
    for _ in range(options.steps):
        loss = normalized_mse(predict(), target_out, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.advance(task)
    with torch.no_grad():
        after = normalized_mse(predict(), target_out, scale).item()
        if after > before:  # never hand back a layer worse than its starting point
            for p, saved in zip(params, initial):
                p.copy_(saved)
            after = before
    for p in params:
        p.requires_grad_(False)
    return LayerFit(layer=i, role=role, error_before=before, error_after=after)


def fits_as_dicts(fits: list[LayerFit]) -> list[dict]:
    return [asdict(f) for f in fits]
