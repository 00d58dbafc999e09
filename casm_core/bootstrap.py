"""Percentile bootstrap intervals over evaluated users (numpy only, seeded).

A metric's value per case comes from its rank (`metrics.case_values`). With several training
seeds, each case's value is first averaged over the seeds (ranks [S, N] -> values [N]): the seeds
share the split, so case i is the same user and positive in every seed, and the interval is over
users, the unit that was sampled, not over seeds (seed spread is reported apart as the std).

The interval of a mean is the `confidence` central range of the means of `replicates` resamples
with replacement. What is resampled is the user: with `groups` (the user of each case; a user may
have several cases, as in the time-cut split) a replicate draws G users out of the G with
replacement and averages all cases of the drawn users (a cluster bootstrap); without, every case is
its own user. A **paired** difference (model minus baseline on the same users) resamples users
once per replicate and applies the draw to both arrays, which is the same as bootstrapping the
per-case differences; identical arrays give exactly [0, 0]. The same `seed` gives the same
resamples for every metric and variant, so intervals of one report are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from casm_core.metrics import case_values

# Resampled user indices held in memory at once (replicates per chunk x users).
_CHUNK_ELEMENTS = 1_000_000


@dataclass(frozen=True)
class Interval:
    """A mean over cases and its bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        """The interval lies strictly above or strictly below 0."""
        return self.low > 0.0 or self.high < 0.0


def per_case(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Values [N] of `metric` per case, averaged over seeds: ranks [N] or [S, N] (0-based)."""
    values = case_values(np.asarray(ranks), metric)
    return values.mean(axis=0) if values.ndim == 2 else values


def bootstrap_means(
    values: np.ndarray, replicates: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Means [replicates] of `values` [N] over resampled users: G draws with replacement out of the
    G distinct `groups` [N] (default: each case its own group), all cases of a drawn user counted."""
    values = np.asarray(values, dtype=np.float64)
    if groups is None:
        sums, sizes = values, np.ones_like(values)
    else:
        _, codes = np.unique(np.asarray(groups), return_inverse=True)
        codes = codes.reshape(-1)
        sums, sizes = np.bincount(codes, weights=values), np.bincount(codes).astype(np.float64)
    g = sums.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(g, 1))
    means = np.empty(replicates, dtype=np.float64)
    for start in range(0, replicates, chunk):
        count = min(chunk, replicates - start)
        drawn = rng.integers(0, g, size=(count, g))  # user indices, G per replicate
        means[start : start + count] = sums[drawn].sum(axis=1) / sizes[drawn].sum(axis=1)
    return means


def interval(
    values: np.ndarray, replicates: int, seed: int, confidence: float = 0.95, groups: np.ndarray | None = None
) -> Interval:
    """Mean of `values` [N] and its percentile bootstrap interval over users (`groups` [N], the
    user of each case; default: one case per user); NaN for N = 0."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"))
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(bootstrap_means(values, replicates, seed, groups), [tail, 1.0 - tail])
    return Interval(float(values.mean()), float(low), float(high))


def metric_interval(
    ranks: np.ndarray, metric: str, replicates: int, seed: int, confidence: float = 0.95,
    groups: np.ndarray | None = None,
) -> Interval:
    """Interval of `metric` from ranks [N] or [S, N] (per-case mean over seeds first)."""
    return interval(per_case(ranks, metric), replicates, seed, confidence, groups)


def paired_difference(
    ranks: np.ndarray, baseline_ranks: np.ndarray, metric: str, replicates: int, seed: int,
    confidence: float = 0.95, groups: np.ndarray | None = None,
) -> Interval:
    """Interval of mean `metric` of `ranks` minus that of `baseline_ranks` on the same N cases
    (each [N] or [S, N]; per-case means over seeds first, then the per-case differences,
    resampled by user)."""
    model, baseline = per_case(ranks, metric), per_case(baseline_ranks, metric)
    if model.shape != baseline.shape:
        raise ValueError(f"paired ranks must cover the same cases: {model.shape} vs {baseline.shape}")
    return interval(model - baseline, replicates, seed, confidence, groups)
