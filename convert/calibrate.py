"""`--init calibrated`: closed-form fits on the source model's own K/V over calibration text.

* FusedKV: for each top layer i, kv head h and RoPE pair j, the key gates (a, b) minimise
  sum (a*K_0 + b*K_m - K_i)^2 over every token and both members of the pair (so the tie that
  keeps attention relative holds), and each value feature's gates (c, d) likewise for V.
  These are 2x2 normal equations per gate pair, solved in one batched call.
* SkipV1Former: own head j's values are v_proj rows applied to the layer's input, the very
  input the source's rows saw, so the least-squares fit of those rows to the original values has
  zero residual at the original rows: the calibrated own heads are the source heads as they are
  (no solve needed, no ridge bias). What calibration decides is which heads to reuse: with
  ``heads="auto"`` each layer reuses the heads whose original values layer 0's heads match best
  and computes the rest.

Errors are relative squared errors of the layer's K and V (SkipV1: V) against the source's,
before (copy init, mean-V own heads included) and after the fit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from models import SharedKVConfig
from models.layout_tensors import attn_key
from models.modeling_sharedkv import rope

from .layerwise import LayerPass
from .plan import skipv1_partners

RIDGE = 1e-6


@dataclass
class CalibratedFit:
    tensors: dict[str, torch.Tensor]
    skipv1_own_heads: list[list[int]] | None
    report: list[dict]


@torch.no_grad()
def layer_kv(step: LayerPass, keys: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Post-RoPE keys (None unless asked) and values of one source layer over the pool, each
    (batch, kv_heads, seq, head_dim)."""
    attn = step.layer.self_attn
    x = step.layer.input_layernorm(step.input)
    v = attn.v_proj(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
    if not keys:
        return None, v
    k = attn.k_proj(x).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
    if hasattr(attn, "k_norm"):  # Qwen3 normalizes each key head before RoPE
        k = attn.k_norm(k)
    return rope(k, *step.ctx.rope), v


def kv_read(cfg: SharedKVConfig) -> dict[int, bool]:
    """The source layers whose K/V the closed-form fit reads, each with whether it reads their keys:
    FusedKV the bottom, middle and top layers' keys and values, SkipV1 every layer's values, the
    other layouts nothing. Only these are kept over the whole pool."""
    if cfg.kv_layout == "fusedkv":
        fused = [i for i in range(cfg.num_hidden_layers) if cfg.layer_role(i) == "fused"]
        return dict.fromkeys([0, cfg.middle_layer, *fused], True)
    if cfg.kv_layout == "skipv1":
        return dict.fromkeys(range(cfg.num_hidden_layers), False)
    return {}


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    return ((pred - target).pow(2).sum() / target.pow(2).sum()).item()


def solve_gates(x1: torch.Tensor, x2: torch.Tensor, y: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature least squares y ~ a*x1 + b*x2, summing over `dims`; returns (a, b)."""
    s11, s12, s22 = (x1 * x1).sum(dims), (x1 * x2).sum(dims), (x2 * x2).sum(dims)
    s1y, s2y = (x1 * y).sum(dims), (x2 * y).sum(dims)
    gram = torch.stack([torch.stack([s11, s12], -1), torch.stack([s12, s22], -1)], -2).double()
    gram += RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean() * torch.eye(2, dtype=gram.dtype, device=gram.device)
    rhs = torch.stack([s1y, s2y], -1).double().unsqueeze(-1)
    solution = torch.linalg.solve(gram, rhs).squeeze(-1).float()
    return solution[..., 0], solution[..., 1]


def pairs(x: torch.Tensor) -> torch.Tensor:
    """(b, h, t, d) -> (b, h, t, 2, d/2): the two members of every RoPE pair side by side."""
    return x.unflatten(-1, (2, x.shape[-1] // 2))


def fit_fusedkv(cfg: SharedKVConfig, kv: dict) -> CalibratedFit:
    (k0, v0), (km, vm) = kv[0], kv[cfg.middle_layer]
    tensors, report = {}, []
    for i in range(cfg.num_hidden_layers):
        if cfg.layer_role(i) != "fused":
            continue
        ki, vi = kv[i]
        a, b = solve_gates(pairs(k0), pairs(km), pairs(ki), dims=(0, 2, 3))  # (kv_heads, d/2)
        c, d = solve_gates(v0, vm, vi, dims=(0, 2))  # (kv_heads, d)
        gates = {"key_gate_bottom": a, "key_gate_middle": b, "value_gate_bottom": c, "value_gate_middle": d}
        tensors.update((attn_key(i, name), gate) for name, gate in gates.items())
        fused_k = torch.cat([a, a], -1)[None, :, None] * k0 + torch.cat([b, b], -1)[None, :, None] * km
        fused_v = c[None, :, None] * v0 + d[None, :, None] * vm
        report.append({"layer": i, "error_before": (relative_error(km, ki) + relative_error(v0, vi)) / 2,
                       "error_after": (relative_error(fused_k, ki) + relative_error(fused_v, vi)) / 2})
    return CalibratedFit(tensors, None, report)


def skipv1_value_error(v0: torch.Tensor, vi: torch.Tensor, own: list[int], partners: list[int | None] | None) -> float:
    """Relative error of a SkipV1 layer's values: reused heads come from layer 0, own heads are
    the source's (or, for mean-V, the mean of the own head and its partner's values)."""
    approx = v0.clone()
    for j, head in enumerate(own):
        partner = partners[j] if partners else None
        approx[:, head] = vi[:, head] if partner is None else (vi[:, head] + vi[:, partner]) / 2
    return relative_error(approx, vi)


def fit_skipv1(cfg: SharedKVConfig, kv: dict, auto_heads: bool, mean_init: bool) -> CalibratedFit:
    v0 = kv[0][1]
    heads, report = [list(range(cfg.num_key_value_heads))], []
    for i in range(1, cfg.num_hidden_layers):
        vi = kv[i][1]
        own = cfg.skipv1_own_heads[i]
        partners = skipv1_partners(own, cfg.num_key_value_heads) if mean_init else None
        before = skipv1_value_error(v0, vi, own, partners)
        if auto_heads:  # own = the heads layer 0 would replace worst
            reuse_error = (v0 - vi).pow(2).sum((0, 2, 3))
            own = sorted(reuse_error.argsort(descending=True)[: len(own)].tolist())
        heads.append(own)
        report.append({"layer": i, "own_heads": own, "error_before": before,
                       "error_after": skipv1_value_error(v0, vi, own, None)})
    return CalibratedFit({}, heads, report)


def calibrate(cfg: SharedKVConfig, kv: dict[int, tuple[torch.Tensor | None, torch.Tensor]], auto_heads: bool = False,
              mean_init: bool = True) -> CalibratedFit:
    """Fit the layout's new tensors on the source's K/V (layer_kv of the layers kv_read names);
    mean_init says how copy init set SkipV1's own heads."""
    if cfg.kv_layout == "fusedkv":
        return fit_fusedkv(cfg, kv)
    if cfg.kv_layout == "skipv1":
        return fit_skipv1(cfg, kv, auto_heads, mean_init)
    return CalibratedFit({}, None, [])  # FusedKV-Lite and CommonKV have nothing to fit in closed form
