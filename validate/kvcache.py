"""KV-cache bytes per token, by the config's arithmetic and measured from the cache object after
decoding, and decode speed.

The measured number comes from the tensors the cache really holds (``kv_cache_bytes``), so a
layout that claims a saving but still stores K/V somewhere shows up as a mismatch with the
arithmetic of its config.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from models.kv_layout import dense_kv_elements_per_token

if TYPE_CHECKING:
    from transformers import Cache

WARMUP_STEPS = 4  # decode steps of the untimed run: the first calls are behind by then


def kv_bytes_per_token(config, bytes_per_element: int) -> int:
    """KV-cache bytes one token costs (batch 1) by the config's arithmetic: its layout's, or the
    dense cache of a model without one (a source, the control arm)."""
    if hasattr(config, "kv_cache_bytes_per_token"):
        return config.kv_cache_bytes_per_token(bytes_per_element)
    return dense_kv_elements_per_token(config) * bytes_per_element


def kv_cache_bytes(cache: Cache) -> int:
    """Bytes the cache object really holds (keys and values of every layer that stores any)."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Decoded:
    """What ``decode`` left: the cache, and how long the prefill and each timed step took."""

    cache: Cache
    prefill_s: float
    step_s: list[float]

    @property
    def step_median_s(self) -> float:
        """The median step's seconds: a step that another process on the machine slowed does not move it."""
        return statistics.median(self.step_s)


@torch.inference_mode()
def decode(model, ids: torch.Tensor, new_tokens: int, chunk: int | None = None) -> Decoded:
    """Prefill ids (in chunks of ``chunk`` tokens if given: activations then stay small next to the
    cache), one untimed greedy step, then ``new_tokens`` greedy steps timed one by one (on a GPU each
    ends with a synchronize, so a step's time is its kernels', not their launch)."""
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    start, cache, step = time.perf_counter(), None, chunk or ids.shape[1]
    for begin in range(0, ids.shape[1], step):
        out = model(ids[:, begin : begin + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
    sync()
    prefill_s = time.perf_counter() - start
    token, seconds = out.logits[:, -1:].argmax(-1), []
    for _ in range(new_tokens + 1):
        start = time.perf_counter()
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync()
        seconds.append(time.perf_counter() - start)
    return Decoded(cache, prefill_s, seconds[1:])


def measure_decode(model, prompt_tokens: int, new_tokens: int, seed: int = 0) -> dict:
    """Prefill a random prompt of ``prompt_tokens``, decode greedily (batch 1), then read the cache.

    Every model is timed the same way, so that their speeds compare: a short run untimed first
    (first calls allocate and choose kernels), then the run, with one untimed step and ``new_tokens``
    (>= 1) steps timed one by one; the speed is the median step's.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator).to(model.device)
    decode(model, ids, min(new_tokens, WARMUP_STEPS))
    run = decode(model, ids, new_tokens)
    cached = run.cache.get_seq_length()
    measured = kv_cache_bytes(run.cache)
    return {"context": prompt_tokens, "cached_tokens": cached, "kv_cache_bytes": measured,
            "kv_bytes_per_token": measured / cached, "decode_tokens_per_s": 1 / run.step_median_s}
