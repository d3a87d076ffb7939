"""Paired bootstrap over windows: is the candidate's perplexity really different from the reference?

Both models are scored on the same windows, so windows are resampled together and the noise that
comes from which text was picked cancels out: only the per-window difference in NLL varies.
"""
from __future__ import annotations

import numpy as np

from .perplexity import WindowScores


def ratio_interval(candidate: WindowScores, reference: WindowScores, samples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of ppl(candidate)/ppl(reference) over ``samples`` resamplings of the windows;
    None from a single window, whose every resampling is the point estimate again (no interval at all)."""
    if len(candidate.nll) < 2:
        return None
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(candidate.nll), size=(samples, len(candidate.nll)))
    diff = (candidate.nll - reference.nll)[picks].sum(1) / candidate.count[picks].sum(1)
    low, high = np.quantile(np.exp(diff), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
