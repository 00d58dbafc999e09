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


def rank_in_full(scores: np.ndarray, positives: np.ndarray, excluded: np.ndarray | None = None) -> np.ndarray:
    """Ranks [B] of item `positives[b]` among all items, scores [B, num_items + 1] (column 0 is
    padding and never competes). `excluded` bool [B, num_items + 1] marks further items that do
    not compete in their row (the positive is ranked whether or not it is marked)."""
    rows = np.arange(scores.shape[0])
    positive = scores[rows, positives][:, None]
    ahead = scores >= positive
    ahead[rows, positives] = False
    ahead[:, 0] = False
    if excluded is not None:
        ahead &= ~excluded
    return ahead.sum(axis=1).astype(np.int64)


def case_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-case value (same shape as `ranks`) of metric ``"hr@k"``, ``"ndcg@k"`` or ``"mrr"``:
    hit 0/1, gain 1/log2(rank + 2) within k (else 0), or 1/(rank + 1)."""
    ranks = np.asarray(ranks)
    name, _, k_text = metric.partition("@")
    if name == "mrr" and not k_text:
        return 1.0 / (ranks + 1.0)
    if name not in ("hr", "ndcg") or not k_text.isdigit():
        raise ValueError(f"unknown metric {metric!r}; expected 'hr@K', 'ndcg@K' or 'mrr'")
    within = ranks < int(k_text)
    if name == "hr":
        return within.astype(np.float64)
    return np.where(within, 1.0 / np.log2(ranks + 2.0), 0.0)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of ranks below k."""
    return _mean(case_values(ranks, f"hr@{k}"))


def ndcg(ranks: np.ndarray, k: int) -> float:
    """Mean NDCG@k of a single relevant item per row."""
    return _mean(case_values(ranks, f"ndcg@{k}"))


def mrr(ranks: np.ndarray) -> float:
    """Mean reciprocal rank."""
    return _mean(case_values(ranks, "mrr"))


def summarize(ranks: np.ndarray, ks: Iterable[int], prefix: str = "") -> dict[str, float]:
    """``{prefix + "hr@k": ..., prefix + "ndcg@k": ...}`` for every k, plus MRR."""
    result: dict[str, float] = {}
    for k in ks:
        result[f"{prefix}hr@{k}"] = hit_rate(ranks, k)
        result[f"{prefix}ndcg@{k}"] = ndcg(ranks, k)
    result[f"{prefix}mrr"] = mrr(ranks)
    return result
