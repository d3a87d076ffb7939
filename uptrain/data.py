"""Training data: the recipe's sources as token stores, cut into packed sequences of seq_len.

Each source is a token store (token_store.py); sequence i of a store is its tokens
[i x seq_len, (i + 1) x seq_len), documents joined by EOS. Without eval_data, the last
eval_fraction of each source's sequences is held out and the eval set is drawn from those tails.
The sampler (sampler.py) says which sequences a rank reads at a step; only those are read.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.data import DataSpec, parse_specs
from common.errors import UserError

from .recipe import Recipe
from .sampler import StepSampler, apportion
from .token_store import TokenStore, content_fingerprint, prepare, tokens_hash


@dataclass
class TrainData:
    specs: list[DataSpec]
    stores: list[TokenStore]
    train_sizes: list[int]  # sequences of each store that training draws from
    eval_sequences: torch.Tensor  # (n, seq_len), held out
    seq_len: int
    eval_specs: list[DataSpec] = field(default_factory=list)  # eval_data's, when given
    eval_stores: list[TokenStore] = field(default_factory=list)

    def sampler(self, recipe: Recipe, world_size: int) -> StepSampler:
        return StepSampler(self.train_sizes, [s.weight for s in self.specs], recipe.micro_batch, recipe.grad_accum,
                           world_size, recipe.seed)

    def batch(self, slots: list[tuple[int, int]]) -> torch.Tensor:
        """The micro-batch of (source, sequence) slots, as int64 token ids."""
        return torch.stack([torch.from_numpy(self.stores[c].sequences([i], self.seq_len)[0]) for c, i in slots])

    def inputs(self) -> list[dict]:
        """What the run reads, by content: each source's files (content_fingerprint) and its token
        store's count and hash; run.json holds them from the start and a resume must find them equal."""
        return [{"data": spec.path, "content": content_fingerprint(spec), "tokens": len(store.tokens),
                 "sha256": tokens_hash(store)}
                for spec, store in zip(self.specs + self.eval_specs, self.stores + self.eval_stores)]

    def describe(self) -> str:
        parts = [f"{s.path} ({n:,} sequences{f', weight {s.weight:g}' if len(self.specs) > 1 else ''})"
                 for s, n in zip(self.specs, self.train_sizes)]
        return f"{'; '.join(parts)}; {len(self.eval_sequences)} eval sequences"


def is_builder() -> bool:
    """The first rank on each node tokenizes; the others wait for its store."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def stream_caps(specs: list[DataSpec], train_tokens: int | None, eval_tokens: int) -> list[int | None]:
    """Tokens to read from each streamed source: its share of the budget plus the eval slice (local ones: all)."""
    total = sum(s.weight for s in specs)
    return [math.ceil(train_tokens * s.weight / total * 1.01) + 2 * eval_tokens if s.streaming and train_tokens
            else None for s in specs]


def stores_of(specs: list[DataSpec], tokenizer, recipe: Recipe, caps: list[int | None]) -> list[TokenStore]:
    return [prepare(spec, tokenizer, Path(recipe.token_cache), is_builder(), cap) for spec, cap in zip(specs, caps)]


def too_small(spec: DataSpec, store: TokenStore, seq_len: int, need: int) -> UserError:
    return UserError(f"data {spec.path!r} has {len(store.tokens):,} tokens: {store.sequence_count(seq_len)} sequences "
                     f"of seq_len={seq_len}, fewer than the {need} it needs; give more text or a shorter seq_len")


def train_specs(recipe: Recipe) -> list[DataSpec]:
    return parse_specs(recipe.data)


def eval_specs(recipe: Recipe) -> list[DataSpec]:
    """eval_data's specs (their default split is test), none without eval_data."""
    return parse_specs(recipe.eval_data, split="test") if recipe.eval_data is not None else []


def prepare_data(recipe: Recipe, tokenizer, train_tokens: int | None = None) -> TrainData:
    """Token stores for data and eval_data (built once, on the first rank of each node), sizes checked."""
    specs = train_specs(recipe)
    stores = stores_of(specs, tokenizer, recipe, stream_caps(specs, train_tokens, recipe.eval_tokens))
    n_eval = max(1, recipe.eval_tokens // recipe.seq_len)
    counts = [store.sequence_count(recipe.seq_len) for store in stores]
    if recipe.eval_data is not None:
        held_out = eval_specs(recipe)
        eval_stores = stores_of(held_out, tokenizer, recipe, [recipe.eval_tokens * 2 if s.streaming else None
                                                              for s in held_out])
        train_sizes = counts
        starts = [0] * len(eval_stores)
        available = [store.sequence_count(recipe.seq_len) for store in eval_stores]
    else:
        held_out, eval_stores = specs, stores
        held = [max(1, int(n * recipe.eval_fraction)) for n in counts]
        train_sizes = [n - h for n, h in zip(counts, held)]
        starts, available = train_sizes, held
    for spec, store, n in zip(specs, stores, train_sizes):
        if n < 1:
            raise too_small(spec, store, recipe.seq_len, 1 if recipe.eval_data is not None else 2)
    for spec, store, n in zip(held_out, eval_stores, available):
        if n < 1:
            raise too_small(spec, store, recipe.seq_len, 1)
    taken = [min(k, n) for k, n in zip(apportion([s.weight for s in held_out], n_eval), available)]
    eval_sequences = torch.cat([torch.from_numpy(store.sequences(range(start, start + k), recipe.seq_len))
                                for store, start, k in zip(eval_stores, starts, taken) if k])
    separate = recipe.eval_data is not None
    return TrainData(specs, stores, train_sizes, eval_sequences, recipe.seq_len, held_out if separate else [],
                     eval_stores if separate else [])
