"""Which packed sequences each rank trains on at a given step: a pure function of (seed, step).

A step takes P = micro_batch x grad_accum x world_size sequences, its global slots; rank r's
micro-batch m holds slots [(m x world_size + r) x micro_batch, ... + micro_batch). So the sequences
of step s do not depend on how P is split among ranks, and a resume needs only the step.

Mixtures: after step s, source c has had W_c(s x P) sequences, where W is Webster's apportionment
of the total by the weights. Webster's method hands out seats in one fixed order of priority, so
W_c never decreases as the total grows: step s takes W_c((s+1)P) - W_c(sP) sequences of c, and
the realised shares stay within one sequence of the weights at every step.

Within a source, the k-th sequence drawn is position k mod n of epoch k // n, through a keyed
pseudo-random permutation of [0, n) (a Feistel network with cycle walking): any position of a
shuffled epoch, with nothing stored, so memory does not grow with the corpus.
"""
from __future__ import annotations

import math

import numpy as np

MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def apportion(weights: list[float], total: int) -> list[int]:
    """Webster's (Sainte-Lague) split of total among weights; never fewer for anyone as total grows."""
    shares = [w / sum(weights) for w in weights]
    seats = [math.floor(total * s + 0.5) for s in shares]

    def priority(c: int, seat: int) -> tuple[float, int]:  # the order in which seats are handed out
        return shares[c] / (seat + 0.5), -c

    while sum(seats) > total:  # take back the last seat handed out
        c = min((c for c in range(len(seats)) if seats[c]), key=lambda c: priority(c, seats[c] - 1))
        seats[c] -= 1
    while sum(seats) < total:  # hand out the next seat
        c = max(range(len(seats)), key=lambda c: priority(c, seats[c]))
        seats[c] += 1
    return seats


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well-spread 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(positions: np.ndarray, n: int, key: int) -> np.ndarray:
    """A keyed pseudo-random bijection of [0, n) applied to positions (each in [0, n))."""
    half = max(1, math.ceil(max(1, n - 1).bit_length() / 2))
    mask = np.uint64((1 << half) - 1)
    keys = _mix(np.arange(4, dtype=np.uint64) + np.uint64(key & 0xFFFFFFFFFFFFFFFF))

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for k in keys:
            left, right = right, left ^ (_mix(right ^ k) & mask)
        return (left << np.uint64(half)) | right

    out = np.asarray(positions, dtype=np.uint64).copy()
    pending = np.arange(len(out))
    current = out.copy()
    while pending.size:  # cycle walking: re-apply until the value falls inside [0, n)
        current = feistel(current)
        inside = current < np.uint64(n)
        out[pending[inside]] = current[inside]
        pending, current = pending[~inside], current[~inside]
    return out.astype(np.int64)


class StepSampler:
    """(source, sequence index) of every sequence a rank's micro-batch holds at a step."""

    def __init__(self, sizes: list[int], weights: list[float], micro_batch: int, grad_accum: int, world_size: int,
                 seed: int):
        self.sizes, self.weights = sizes, weights
        self.micro_batch, self.world_size, self.seed = micro_batch, world_size, seed
        self.per_step = micro_batch * grad_accum * world_size

    def _drawn(self, step: int) -> list[int]:
        return apportion(self.weights, step * self.per_step) if len(self.sizes) > 1 else [step * self.per_step]

    def step_slots(self, step: int) -> list[tuple[int, int]]:
        """All P (source, sequence) pairs of a step, in slot order."""
        before, after = self._drawn(step), self._drawn(step + 1)
        slots = []
        for c, (n, first, last) in enumerate(zip(self.sizes, before, after)):
            drawn = np.arange(first, last)
            for epoch in np.unique(drawn // n):
                in_epoch = drawn[drawn // n == epoch]
                key = (self.seed * 1_000_003 + c) * 1_000_003 + int(epoch)
                slots += [(c, int(i)) for i in permute(in_epoch % n, n, key)]
        if len(self.sizes) > 1:  # interleave the sources within the step, the same way on every rank
            order = np.random.default_rng([self.seed, step]).permutation(len(slots))
            slots = [slots[i] for i in order]
        return slots

    def micro_batch_at(self, step: int, micro: int, rank: int) -> list[tuple[int, int]]:
        first = (micro * self.world_size + rank) * self.micro_batch
        return self.step_slots(step)[first : first + self.micro_batch]
