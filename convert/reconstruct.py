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

Only the layer being fitted trains, and only the tensors through which it adapts to its new K/V
(``models.layout_tensors.ADAPTING``: its gates, q_proj, o_proj and, for SkipV1, its own-head
v_proj; for CommonKV its kv_up and, on a group's anchor, the shared kv_down, starting from the
SVD; Qwen3's q_norm, and CommonKV's k_norm, with the projection they normalize); everything else
is frozen. Each Adam step sees a batch of calibration sequences, so the pool
(``--calib-tokens``) can be much larger than a batch: with the ~0.7M parameters of a SmolLM2
layer, 2,048 tokens are fitted far better than held-out text is.

Source and target are LayerwiseModels (convert/layerwise.py): one layer of each is in memory at
a time. The source activations ((2 x layers + 1) x tokens x hidden floats: 2.3 GB for SmolLM2 at
the default 16,384 tokens) stay on the host; the layer being fitted moves its own to the device
(GPU when there is one). Above SPILL_ABOVE_BYTES they live in memory-mapped files in a temporary
folder beside the output, which the kernel can page out.
"""
from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from common.console import progress
from common.errors import UserError
from common.outputs import stage_prefix
from models.layout_tensors import adapting_modules, attn_key, module_of

from .layerwise import LayerPass, LayerwiseModel, PoolContext, call_layer, pool_context

SPILL_ABOVE_BYTES = 2 << 30  # source activations larger than this go to memory-mapped files


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


class SourceActivations:
    """Every source layer's input (plus the last output) and attention output over the pool, on the
    host (RAM or spill_dir), filled by `store` from run_source; each fitted layer moves its own to the device."""

    def __init__(self, config, ids: torch.Tensor, spill_dir: Path | None = None):
        shape = (*ids.shape, config.hidden_size)
        self.hidden = [host_buffer(shape, spill_dir, f"hidden-{i}") for i in range(config.num_hidden_layers + 1)]
        self.attention = [host_buffer(shape, spill_dir, f"attn-{i}") for i in range(config.num_hidden_layers)]

    def store(self, step: LayerPass) -> None:
        self.hidden[step.index].copy_(step.input)
        self.attention[step.index].copy_(step.attention)
        if step.index == len(self.attention) - 1:
            self.hidden[-1].copy_(step.output)


@contextlib.contextmanager
def spill_folder(source_config, ids: torch.Tensor, out: Path) -> Iterator[Path | None]:
    """A temporary folder beside the output folder `out` for the source activations when they
    exceed SPILL_ABOVE_BYTES, else None. It is named as a stage of `out` (common.outputs), so the
    next run on `out` removes it if this one is killed."""
    buffers = 2 * source_config.num_hidden_layers + 1  # SourceActivations: each layer's input and attention, the output
    needed = buffers * ids.numel() * source_config.hidden_size * 4
    if needed <= SPILL_ABOVE_BYTES:
        yield None
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=stage_prefix(out, "activations"), dir=out.parent) as folder:
        yield Path(folder)


def reconstruct(source: SourceActivations, target: LayerwiseModel, ids: torch.Tensor,
                options: ReconstructOptions = ReconstructOptions()) -> tuple[list[LayerFit], dict[str, torch.Tensor]]:
    """Fit target's changed layers against the source's activations on token ids (batch, seq), one
    target layer in memory at a time; returns per-layer errors and the fitted tensors (on the CPU)."""
    if options.mode not in ("sequential", "independent"):
        raise ValueError(f"unknown reconstruct mode {options.mode!r}")
    torch.manual_seed(options.seed)
    config = target.config
    hidden = target.embed(ids)
    ctx = pool_context(target, hidden)
    shared_kv: dict = {}  # the storing layers' K/V over the whole pool, published by their forward pass
    changed = [i for i in range(config.num_hidden_layers) if adapting_modules(config, i)]
    fits: list[LayerFit] = []
    fitted: dict[str, torch.Tensor] = {}
    with progress() as bar:
        task = bar.add_task(f"reconstruct ({options.mode})", total=len(changed) * options.steps)
        fitter = LayerFitter(source, ctx, shared_kv, options, advance=lambda: bar.advance(task))
        for i in range(config.num_hidden_layers):
            layer_input = hidden if options.mode == "sequential" else source.hidden[i].to(ids.device)
            with target.layer(i) as layer:
                layer.requires_grad_(False)
                if i in changed:
                    params = adapting_params(layer, config, i)
                    fits.append(fitter.fit(layer, i, config.layer_role(i), list(params.values()), layer_input))
                    fitted.update((attn_key(i, name), p.detach().to("cpu", copy=True)) for name, p in params.items())
                with torch.no_grad():  # storage layers publish their K/V into shared_kv here
                    hidden = call_layer(layer, layer_input, ctx, shared_kv=shared_kv)
    return fits, fitted


def adapting_params(layer: nn.Module, config, index: int) -> dict[str, nn.Parameter]:
    """The attention parameters (names under self_attn) through which layer `index` adapts: what reconstruct fits."""
    modules = adapting_modules(config, index)
    return {name: p for name, p in layer.self_attn.named_parameters() if module_of(name) in modules}


def _attention(layer: nn.Module, hidden: torch.Tensor, ctx: PoolContext, shared_kv: dict) -> torch.Tensor:
    out, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=ctx.rope,
                             attention_mask=ctx.mask, shared_kv=shared_kv)
    return out


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor | slice]:
    """Indices of the calibration sequences for each step: the whole pool when it is no larger
    than a batch, else shuffled passes over it (every sequence once per pass)."""
    while True:
        if n <= size:
            yield slice(None)
            continue
        order = torch.randperm(n, generator=generator)
        yield from order[: n - n % size].split(size)


def _select(shared_kv: dict, idx: torch.Tensor | slice) -> dict:
    """The published K/V of a batch of the calibration sequences."""
    if isinstance(idx, slice):
        return shared_kv
    return {layer: tuple(t if t is None else t[idx] for t in kv) for layer, kv in shared_kv.items()}


@dataclass
class LayerFitter:
    """What every changed layer's fit shares: the source's activations, the pool's RoPE and mask, the
    K/V the storing layers published, the options, and the progress bar's step."""

    source: SourceActivations
    ctx: PoolContext
    shared_kv: dict
    options: ReconstructOptions
    advance: Callable[[], None]

    def fit(self, layer: nn.Module, i: int, role: str, params: list[nn.Parameter],
            layer_input: torch.Tensor) -> LayerFit:
        """Train params (layer i's adapting tensors) until its attention reproduces the source's; a fit
        that ends worse than it started is undone."""
        source, options = self.source, self.options
        for p in params:
            p.requires_grad_(True)
        # Both modes fit the attention output; sequential mode also asks it to cancel the drift that
        # the converted layers below left in its input, so the residual stream after this attention
        # lands where the source's did: h_conv + attn(h_conv) = h_src + attn_src.
        source_out = source.attention[i].to(layer_input.device)
        target_out = source_out + (source.hidden[i].to(layer_input.device) - layer_input if options.mode == "sequential" else 0)

        def error(idx: torch.Tensor | slice = slice(None)) -> torch.Tensor:
            pred = _attention(layer, layer_input[idx], self.ctx, _select(self.shared_kv, idx))
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
            self.advance()
        with torch.no_grad():
            after = error().item()
            if not math.isfinite(after):  # the learning rate, not the source: the fit started finite
                raise UserError(f"reconstruct diverged on layer {i} at --reconstruct-lr {options.lr:g} (its error went "
                                f"from {before:.3g} to {after}); lower --reconstruct-lr")
            if after > before:  # never hand back a layer worse than its starting point
                for p, saved in zip(params, initial):
                    p.copy_(saved)
                after = before
        for p in params:
            p.requires_grad_(False)
        return LayerFit(layer=i, role=role, error_before=before, error_after=after)


def fits_as_dicts(fits: list[LayerFit]) -> list[dict]:
    return [asdict(f) for f in fits]
