"""Reading and writing vLLM's paged KV cache from layers vLLM's attention cannot express.

vLLM gives every cache-owning layer a tensor of (blocks, head slots, block_size, features) (the CPU
backend's layout; a storage layer's features are its keys' then its values' head_dim, stacked along
the token axis) and, per forward step, each request's block table, query tokens and context length.
A shared-KV layer here reads the caches of the layers it shares with through the forward context,
gathers one request's tokens at a time and attends in plain torch.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from vllm.forward_context import get_forward_context

# vLLM's CPU attention kernels (ISAs) whose cache layout keys_values reads; AMX and the ARM, Power,
# s390x and RISC-V kernels pack blocks their own way.
KERNELS_WITH_TRANSPOSED_KEYS = ("vec", "vec16")


@dataclass
class Request:
    tokens: slice  # this request's rows of the step's flattened query tokens
    context: int  # tokens in its cache, the new ones included
    blocks: torch.Tensor  # its block table row


def requests(layer_name: str) -> Iterator[Request]:
    """The requests of this forward step, as vLLM's metadata for ``layer_name``'s cache group has them.
    Nothing when vLLM runs the model without metadata (its start-up profiling run)."""
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or layer_name not in metadata:
        return
    metadata = metadata[layer_name]
    starts, contexts = metadata.query_start_loc.tolist(), metadata.seq_lens.tolist()
    for i, context in enumerate(contexts):
        yield Request(slice(starts[i], starts[i + 1]), context, metadata.block_table[i])


def cache_of(layer_name: str) -> torch.Tensor:
    """The cache tensor vLLM bound to ``layer_name``: (blocks, head slots, block_size, features)."""
    return get_forward_context().no_compile_layers[layer_name].kv_cache


def keys_values(layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A vLLM attention layer's cache as (keys, values), each (blocks, kv_heads, block_size, head_dim)."""
    layer = get_forward_context().no_compile_layers[layer_name]
    if layer.isa not in KERNELS_WITH_TRANSPOSED_KEYS:
        raise NotImplementedError(f"reading a shared cache written by vLLM's {layer.isa!r} CPU kernel is not supported")
    blocks, heads, block_size, _ = layer.kv_cache.shape
    keys, values = layer.kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    # these kernels store each block's keys transposed, (head_dim, block_size), and values as they are
    return keys.reshape(blocks, heads, -1, block_size).transpose(-1, -2), values


def gather(cache: torch.Tensor, request: Request) -> torch.Tensor:
    """One request's cached tokens: (head slots, context, features)."""
    block_size = cache.shape[2]
    blocks = request.blocks[: -(-request.context // block_size)]
    return cache[blocks].transpose(0, 1).flatten(1, 2)[:, : request.context]


def write(cache: torch.Tensor, rows: torch.Tensor, layer_name: str) -> None:
    """Store (tokens, head slots, features) rows at the step's slots for ``layer_name`` (-1: padding).
    Nothing in vLLM's warm-up runs, which have no slots (and no cache yet)."""
    slots = (get_forward_context().slot_mapping or {}).get(layer_name)
    if slots is None:
        return
    slots = slots[: rows.shape[0]]
    keep = slots >= 0
    slots, rows = slots[keep], rows[keep]
    block_size = cache.shape[2]
    cache[slots // block_size, :, slots % block_size] = rows.to(cache.dtype)


def causal_softmax(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax over the context of (..., queries, context) scores, in float32; the queries are the
    context's last tokens, each attending to itself and what precedes it."""
    queries, context = scores.shape[-2:]
    last = torch.arange(context - queries, context, device=scores.device)[:, None]
    mask = torch.arange(context, device=scores.device)[None] <= last
    return (scores.float() * scale).masked_fill(~mask, float("-inf")).softmax(-1)
