"""Training data: documents -> tokens (cached on disk) -> packed fixed-length sequences.

The batch of step s is a pure function of (seed, s), so the data position after a resume is
just the step number and every rank knows its shard without coordination.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from common.data import read_documents
from common.errors import UserError

CACHE_DIR = Path(".cache") / "tokens"


def _cache_key(spec: str, tokenizer, seq_len: int) -> str:
    digest = hashlib.sha256()
    path = Path(spec)
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    for f in files:
        if f.is_file():
            digest.update(f.name.encode() + str(f.stat().st_size).encode() + str(f.stat().st_mtime_ns).encode())
    digest.update(spec.encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(str(seq_len).encode())
    return digest.hexdigest()[:16]


def packed_sequences(spec: str, tokenizer, seq_len: int, split: str = "train") -> torch.Tensor:
    """(n, seq_len) token ids: documents joined with EOS, cut into full sequences; cached on disk."""
    cache = CACHE_DIR / f"{_cache_key(spec, tokenizer, seq_len)}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for doc in read_documents(spec, split=split):
        if doc.strip():
            stream.extend(tokenizer(doc)["input_ids"])
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(f"data {spec!r} has {len(stream)} tokens, fewer than one sequence of seq_len={seq_len}")
    sequences = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(sequences, tmp)
    tmp.replace(cache)
    return sequences


class StepSampler:
    """Which sequences each rank's micro-batch holds at a given step (a fresh permutation per epoch)."""

    def __init__(self, sequences: torch.Tensor, micro_batch: int, grad_accum: int, world_size: int, seed: int):
        self.sequences, self.micro_batch, self.grad_accum = sequences, micro_batch, grad_accum
        self.world_size, self.seed = world_size, seed
        self.per_step = micro_batch * grad_accum * world_size
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._permutations = {epoch: torch.randperm(len(self.sequences), generator=generator)}
        return self._permutations[epoch]

    def micro_batch_at(self, step: int, micro: int, rank: int) -> torch.Tensor:
        first = step * self.per_step + (micro * self.world_size + rank) * self.micro_batch
        idx = [first + j for j in range(self.micro_batch)]
        n = len(self.sequences)
        return torch.stack([self.sequences[self._permutation(i // n)[i % n]] for i in idx])
