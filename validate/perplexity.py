"""Strided sliding-window perplexity, kept per window so differences can be bootstrapped.

Windows of ``context`` tokens move by ``stride``; in each window only the tokens not scored by
an earlier window count (Hugging Face's perplexity guide): with stride < context every token
after the first is scored exactly once, with at least ``context - stride`` tokens of left context;
with stride == context the windows do not overlap and each window's first token goes unscored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.console import progress


@dataclass
class WindowScores:
    nll: np.ndarray  # summed negative log-likelihood of the tokens each window scores (nats)
    count: np.ndarray  # how many tokens each window scores

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); inf for a model that diverged (NaN scores, or a mean past exp's range)."""
        mean = float(self.nll.sum() / self.count.sum())
        if math.isnan(mean):
            return math.inf
        try:
            return math.exp(mean)
        except OverflowError:
            return math.inf


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) for each window."""
    spans, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + context, n_tokens)
        spans.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            return spans
        begin += stride


@torch.inference_mode()
def score_windows(model, ids: torch.Tensor, context: int, stride: int, label: str = "perplexity") -> WindowScores:
    """ids: 1-D token tensor. Returns per-window NLL sums and scored-token counts."""
    spans = windows(len(ids), context, stride)
    ids = ids.to(model.device)
    nll, count = np.zeros(len(spans)), np.zeros(len(spans), dtype=np.int64)
    with progress() as bar:
        task = bar.add_task(label, total=len(spans))
        for w, (begin, end, first) in enumerate(spans):
            targets = ids[first:end]
            # Only the positions that predict scored tokens need logits (the last end - first + 1,
            # dropping the final one): skips the vocabulary projection for the overlap.
            logits = model(ids[begin:end][None], use_cache=False, logits_to_keep=len(targets) + 1).logits
            logits = logits[0, :-1].float()
            nll[w] = F.cross_entropy(logits, targets, reduction="sum").item()
            count[w] = len(targets)
            bar.advance(task)
    return WindowScores(nll, count)
