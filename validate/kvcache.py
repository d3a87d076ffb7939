"""KV-cache bytes per token measured from the cache object after decoding, and decode speed."""
from __future__ import annotations

import time

import torch

from models import kv_cache_bytes


def arithmetic_bytes_per_token(config, dtype: torch.dtype) -> int:
    """What the layout says one token costs (batch 1)."""
    element = torch.tensor([], dtype=dtype).element_size()
    if hasattr(config, "kv_cache_bytes_per_token"):
        return config.kv_cache_bytes_per_token(element)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


@torch.inference_mode()
def measure_decode(model, prompt_tokens: int, new_tokens: int, seed: int = 0) -> dict:
    """Prefill a random prompt, decode greedily; cache bytes per token and decode tokens/s."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    seconds = time.perf_counter() - start
    total = prompt_tokens + new_tokens
    return {"context": prompt_tokens, "cached_tokens": total, "kv_cache_bytes": kv_cache_bytes(cache),
            "kv_bytes_per_token": kv_cache_bytes(cache) / total, "decode_tokens_per_s": new_tokens / seconds}
