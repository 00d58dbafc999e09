"""Ranking metrics from scores.

A rank is 0-based: the number of competing candidates that score higher than the positive, plus
those that tie with it (ties count against the positive, so a model that scores everything equal
gets no credit). HR@K = mean(rank < K); NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0),
the usual form for a single relevant item.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def rank_among(scores: np.ndarray, positive_column: int = 0) -> np.ndarray:
    """Ranks [B] of the positive in column `positive_column` of scores [B, C] among the row."""
    positive = scores[:, positive_column : positive_column + 1]
    ahead = (scores > positive) | (scores == positive)
    ahead[:, positive_column] = False
    return ahead.sum(axis=1).astype(np.int64)


def rank_in_full(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Ranks [B] of item `positives[b]` among all items, scores [B, num_items + 1] (column 0 is
    padding and never competes)."""
    rows = np.arange(scores.shape[0])
    positive = scores[rows, positives][:, None]
    ahead = scores >= positive
    ahead[rows, positives] = False
    ahead[:, 0] = False
    return ahead.sum(axis=1).astype(np.int64)


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of ranks below k."""
    return float(np.mean(ranks < k)) if ranks.size else float("nan")


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k of a single relevant item per row."""
    if not ranks.size:
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank."""
    return float(np.mean(1.0 / (ranks + 1.0))) if ranks.size else float("nan")


def summarize(ranks: np.ndarray, ks: Iterable[int], prefix: str = "") -> dict[str, float]:
    """``{prefix + "hr@k": ..., prefix + "ndcg@k": ...}`` for every k, plus MRR."""
    result: dict[str, float] = {}
    for k in ks:
        result[f"{prefix}hr@{k}"] = hit_rate(ranks, k)
        result[f"{prefix}ndcg@{k}"] = ndcg(ranks, k)
    result[f"{prefix}mrr"] = mrr(ranks)
    return result
