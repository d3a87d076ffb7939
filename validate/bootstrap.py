"""Paired bootstrap over windows: is the candidate's perplexity really different from the reference?"""
from __future__ import annotations

import numpy as np

from .perplexity import WindowScores


def ratio_interval(candidate: WindowScores, reference: WindowScores, samples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of ppl(candidate)/ppl(reference), resampling the same windows for both."""
    if samples <= 0:
        ratio = float(np.exp((candidate.nll.sum() - reference.nll.sum()) / candidate.count.sum()))
        return ratio, ratio
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(candidate.nll), size=(samples, len(candidate.nll)))
    diff = (candidate.nll - reference.nll)[picks].sum(1) / candidate.count[picks].sum(1)
    low, high = np.quantile(np.exp(diff), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
