"""CommonKV (arXiv 2508.16134) conversion: SVD factors from the weights, ranks from similarity.

Factors. For a group of adjacent layers, each layer's k and v weights are stacked with the
layer's input-norm weight folded in (W_l = [W_k; W_v] * gamma_l, so every layer's factors act on
the same unweighted, RMS-normalized residual stream), the group's W_l are stacked and factored,
W = U S Vt. The shared down-projection is Vt[:r] (applied to the anchor's normed input, so gamma
of the anchor is divided back out), each layer's up-projection is its rows of (U S)[:, :r], and
the k/v biases become the up-projection's bias. At full rank (r = rank of W) the anchor's K/V are
exact; at ratio 1 every group is one layer, so the whole conversion is exact.

Budget. The paper gives dissimilar groups more cache. Each group's similarity s is the mean
cosine similarity, over calibration tokens, between the residual stream entering the anchor and
entering each other layer of the group (1 for a one-layer group: nothing is merged). The budget
(``SharedKVConfig.commonkv_budget``) is split in proportion to size * (2 - s): a group of
identical layers gets one share per layer, dissimilarity adds up to one more (our rule; the
paper's released code sets its per-group merge fractions from a fixed table). Each group's rank
stays within 1..its cap, the rank of its stacked weights.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models import SharedKVConfig
from models.layout_tensors import attn_key, layer_key
from models.source_layout import allocate_ranks

from .layerwise import LayerPass, LayerwiseModel, run_source

NORM_FLOOR = 1e-6  # gamma is divided out of the anchor's down-projection; an exact zero would be inf


def source_keys(cfg: SharedKVConfig, group: int) -> list[str]:
    """Every source tensor a group's factors are computed from."""
    keys = []
    for layer in cfg.commonkv_groups[group]:
        keys.append(layer_key(layer, "input_layernorm.weight"))
        for proj in ("k_proj", "v_proj"):
            keys += [attn_key(layer, f"{proj}.weight")] + ([attn_key(layer, f"{proj}.bias")] if cfg.qkv_bias else [])
    return keys


def _norm_weight(get: Callable[[str], torch.Tensor], layer: int) -> torch.Tensor:
    gamma = get(layer_key(layer, "input_layernorm.weight")).double()
    return torch.where(gamma.abs() < NORM_FLOOR, torch.full_like(gamma, NORM_FLOOR), gamma)


def group_factors(get: Callable[[str], torch.Tensor], cfg: SharedKVConfig, group: int) -> dict[str, torch.Tensor]:
    """Every target tensor of one group, from the source tensors ``get`` returns by name."""
    layers, rank = cfg.commonkv_groups[group], cfg.commonkv_ranks[group]
    folded = [torch.cat([get(attn_key(l, "k_proj.weight")), get(attn_key(l, "v_proj.weight"))]).double() * _norm_weight(get, l)
              for l in layers]
    u, s, vt = torch.linalg.svd(torch.cat(folded), full_matrices=False)
    down = vt[:rank]
    up = (u[:, :rank] * s[:rank]).split([w.shape[0] for w in folded])
    tensors = {attn_key(layers[0], "kv_down.weight"): down / _norm_weight(get, layers[0])}
    for layer, layer_up in zip(layers, up):
        tensors[attn_key(layer, "kv_up.weight")] = layer_up
        if cfg.qkv_bias:
            tensors[attn_key(layer, "kv_up.bias")] = torch.cat([get(attn_key(layer, "k_proj.bias")), get(attn_key(layer, "v_proj.bias"))])
    return {name: t.float() for name, t in tensors.items()}


@torch.no_grad()
def group_similarity(source: LayerwiseModel, cfg: SharedKVConfig, ids: torch.Tensor) -> list[float]:
    """Per group, the mean cosine similarity of the residual stream entering the anchor and each
    other layer of the group, over the pool (one source layer in memory at a time, only the
    current group's anchor input kept)."""
    anchor_of = {l: g[0] for g in cfg.commonkv_groups for l in g}
    anchor_input: dict[int, torch.Tensor] = {}
    sums = [0.0] * len(cfg.commonkv_groups)
    counts = [0] * len(cfg.commonkv_groups)

    def visit(step: LayerPass) -> None:
        if anchor_of[step.index] == step.index:
            anchor_input.clear()
            anchor_input[step.index] = step.input
            return
        group = cfg.commonkv_group(step.index)
        cos = nn.functional.cosine_similarity(step.input, anchor_input[anchor_of[step.index]], dim=-1)
        sums[group] += cos.sum().item()
        counts[group] += cos.numel()

    run_source(source, ids, visit)
    return [total / count if count else 1.0 for total, count in zip(sums, counts)]  # a one-layer group merges nothing


def adaptive_ranks(cfg: SharedKVConfig, similarity: list[float]) -> list[int]:
    """The budget split in proportion to size * (2 - similarity): less similar groups get more rank."""
    weights = [len(g) * (2.0 - s) for g, s in zip(cfg.commonkv_groups, similarity)]
    return allocate_ranks(cfg.commonkv_budget, weights, cfg.commonkv_rank_caps)


def budget_table(rows: list[dict]) -> None:
    """What the similarity bought each group: the user sees where the cache went."""
    from rich.table import Table

    from common.console import console

    table = Table(title="CommonKV budget: hidden-state similarity per group, latent rank uniform -> adaptive")
    for col in ("group", "layers", "similarity", "rank uniform", "rank"):
        table.add_column(col, justify="right")
    for row in rows:
        layers = row["layers"]
        table.add_row(str(row["group"]), f"{layers[0]}-{layers[-1]}", f"{row['similarity']:.4f}",
                      str(row["rank_uniform"]), str(row["rank"]))
    console.print(table)
