"""KV-cache bytes per token measured from the cache object after decoding, and decode speed.

The measured number comes from the tensors the cache really holds (``models.kv_cache_bytes``), so
a layout that claims a saving but still stores K/V somewhere shows up as a mismatch with the
arithmetic of its config.
"""
from __future__ import annotations

import time

import torch

from models import kv_cache_bytes
from models.kv_layout import kv_bytes_per_token


def arithmetic_bytes_per_token(config, dtype: torch.dtype) -> int:
    """What the config says one cached token of dtype costs (batch 1): the layout's arithmetic, or a dense cache's."""
    return kv_bytes_per_token(config, torch.tensor([], dtype=dtype).element_size())


@torch.inference_mode()
def measure_decode(model, prompt_tokens: int, new_tokens: int, seed: int = 0) -> dict:
    """Prefill a random prompt of ``prompt_tokens``, decode greedily (batch 1), then read the cache.

    One decode step runs untimed first (warm-up: first-call allocations would otherwise count);
    ``new_tokens`` (>= 1) further steps are timed with ``time.perf_counter``.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    seconds = 0.0
    for step in range(new_tokens + 1):
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        seconds += (time.perf_counter() - start) if step else 0.0
    cached = cache.get_seq_length()
    measured = kv_cache_bytes(cache)
    return {"context": prompt_tokens, "cached_tokens": cached, "kv_cache_bytes": measured,
            "kv_bytes_per_token": measured / cached,
            "decode_tokens_per_s": new_tokens / seconds}
