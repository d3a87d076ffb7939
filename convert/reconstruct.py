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
v_proj; for CommonKV its kv_up and, on a group's anchor, the shared kv_down, starting from the
SVD); everything else is frozen. Each Adam step sees a batch of calibration sequences, so the
pool (``--calib-tokens``) can be much larger than a batch: with the ~0.7M parameters of a
SmolLM2 layer, 2,048 tokens are fitted far better than held-out text is.

The source activations (2 x layers x tokens x hidden floats: 141 MB for SmolLM2 at 2,048
tokens) stay on the host; the layer being fitted moves its own to the device (GPU when there is
one). Above SPILL_ABOVE_BYTES they live in memory-mapped files in a temporary folder beside the
output, which the kernel can page out.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from common.console import progress

from .calibrate import SOURCE_CHUNK

SPILL_ABOVE_BYTES = 2 << 30  # source activations larger than this go to memory-mapped files

FITTED_PARAMS = {
    "fused": ("q_proj", "o_proj", "key_gate_bottom", "key_gate_middle", "value_gate_bottom", "value_gate_middle"),
    "lite": ("q_proj", "o_proj"),
    "skipv1": ("q_proj", "v_proj", "o_proj"),
    "commonkv": ("q_proj", "kv_down", "kv_up", "o_proj"),  # kv_down only on a group's anchor
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
    batch_sequences: int = 4  # calibration sequences per Adam step: the pool (--calib-tokens) can be far larger


def normalized_mse(pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).sum() / scale


def host_buffer(shape: tuple[int, ...], spill_dir: Path | None, name: str) -> torch.Tensor:
    """A float32 tensor in RAM, or in a memory-mapped file under spill_dir: the kernel can write
    such pages back and drop them, so a large calibration pool does not have to fit in memory."""
    if spill_dir is None:
        return torch.empty(shape)
    return torch.from_file(str(spill_dir / name), shared=True, size=math.prod(shape)).view(shape)


@torch.no_grad()
def source_activations(source: nn.Module, ids: torch.Tensor,
                       spill_dir: Path | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states entering every source layer (plus the last output) and every attention
    output, on the host (RAM or spill_dir); each fitted layer moves only its own to the device."""
    layers = source.model.layers
    shape = (*ids.shape, source.config.hidden_size)
    hidden = [host_buffer(shape, spill_dir, f"hidden-{i}") for i in range(len(layers) + 1)]
    attn_out = [host_buffer(shape, spill_dir, f"attn-{i}") for i in range(len(layers))]
    rows = slice(0, 0)  # the calibration sequences of the chunk running now

    def store(buffer: torch.Tensor, value: torch.Tensor) -> None:
        buffer[rows].copy_(value[0] if isinstance(value, tuple) else value)

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, kw, i=i: store(hidden[i], args[0] if args else kw["hidden_states"]), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, args, out, i=i: store(attn_out[i], out)))
    hooks.append(layers[-1].register_forward_hook(lambda m, args, out: store(hidden[-1], out)))
    try:
        for start in range(0, len(ids), SOURCE_CHUNK):  # the base model only: a large pool's logits would not fit
            rows = slice(start, start + SOURCE_CHUNK)
            source.model(ids[rows], use_cache=False)
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


@contextlib.contextmanager
def spill_folder(source_config, ids: torch.Tensor, near: Path) -> Iterator[Path | None]:
    """A temporary folder beside `near` for the source activations when they exceed SPILL_ABOVE_BYTES, else None."""
    buffers = 2 * source_config.num_hidden_layers + 1  # source_activations: each layer's input and attention, the output
    needed = buffers * ids.numel() * source_config.hidden_size * 4
    if needed <= SPILL_ABOVE_BYTES:
        yield None
        return
    near.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".reconstruct-activations-", dir=near) as folder:
        yield Path(folder)


def reconstruct(source: nn.Module, target: nn.Module, ids: torch.Tensor,
                options: ReconstructOptions = ReconstructOptions(), spill_dir: Path | None = None) -> list[LayerFit]:
    """Fit target's changed layers in place against source on token ids (batch, seq); returns
    per-layer errors. The source activations live in RAM, or in spill_dir when one is given."""
    if options.mode not in ("sequential", "independent"):
        raise ValueError(f"unknown reconstruct mode {options.mode!r}")
    torch.manual_seed(options.seed)
    config = target.config
    src_hidden, src_attn = source_activations(source, ids, spill_dir)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)

    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    embeds = target.model.embed_tokens(ids)
    ctx = {
        "positions": positions,
        "rope": target.model.rotary_emb(embeds, position_ids=positions),
        # one sequence's mask broadcasts over any batch of calibration sequences
        "mask": create_causal_mask(config=config, inputs_embeds=embeds[:1], attention_mask=None,
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
            layer_input = hidden if options.mode == "sequential" else src_hidden[i].to(ids.device)
            if role != "store":
                fits.append(_fit_layer(target, i, role, layer_input, src_hidden, src_attn, ctx, options, bar, task))
            with torch.no_grad():  # storage layers publish their K/V into ctx["shared_kv"] here
                hidden = _layer_forward(target, i, layer_input, ctx)
    for p in target.parameters():
        p.requires_grad_(True)
    return fits


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor | slice]:
    """Indices of the calibration sequences for each step: the whole pool when it is no larger
    than a batch, else shuffled passes over it (every sequence once per pass)."""
    while True:
        if n <= size:
            yield slice(None)
            continue
        order = torch.randperm(n, generator=generator)
        yield from order[: n - n % size].split(size)


def _select(ctx: dict, idx: torch.Tensor | slice) -> dict:
    """ctx for a batch of the calibration sequences: the published K/V of those sequences."""
    if isinstance(idx, slice):
        return ctx
    return {**ctx, "shared_kv": {layer: tuple(t if t is None else t[idx] for t in kv) for layer, kv in ctx["shared_kv"].items()}}


def _fit_layer(target, i, role, layer_input, src_hidden, src_attn, ctx, options, bar, task) -> LayerFit:
    attn = target.model.layers[i].self_attn
    params = [p for name, p in attn.named_parameters() if name.split(".")[0] in FITTED_PARAMS[role]]
    for p in params:
        p.requires_grad_(True)
    # Both modes fit the attention output; sequential mode also asks it to cancel the drift that
    # the converted layers below left in its input, so the residual stream after this attention
    # lands where the source's did: h_conv + attn(h_conv) = h_src + attn_src.
    source_out = src_attn[i].to(layer_input.device)
    target_out = source_out + (src_hidden[i].to(layer_input.device) - layer_input if options.mode == "sequential" else 0)

    def error(idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        pred = _attention(target, i, layer_input[idx], _select(ctx, idx))
        return normalized_mse(pred, target_out[idx], source_out[idx].pow(2).sum())

    with torch.no_grad():
        before = error().item()
    optimizer = torch.optim.Adam(params, lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=options.steps)
    initial = [p.detach().clone() for p in params]
    batches = _batches(len(layer_input), options.batch_sequences, torch.Generator().manual_seed(options.seed + i))
    for _, idx in zip(range(options.steps), batches):
        loss = error(idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.advance(task)
    with torch.no_grad():
        after = error().item()
        if after > before:  # never hand back a layer worse than its starting point
            for p, saved in zip(params, initial):
                p.copy_(saved)
            after = before
    for p in params:
        p.requires_grad_(False)
    return LayerFit(layer=i, role=role, error_before=before, error_after=after)


def fits_as_dicts(fits: list[LayerFit]) -> list[dict]:
    return [asdict(f) for f in fits]
