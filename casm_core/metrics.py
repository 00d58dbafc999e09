"""Ranking metrics from scores: the one home of ranks, HR, NDCG and MRR, for the offline protocol,
the test-then-train event scores and the prequential scoring of published lists.

A rank is 0-based: the number of competing candidates that score higher than the positive, plus
those that tie with it (ties count against the positive, so a model that scores everything equal
gets no credit). HR@K = mean(rank < K); NDCG@K = mean(1 / log2(rank + 2) if rank < K else 0),
the usual form for a single relevant item. The rank functions take numpy arrays or torch tensors
(on any device) and return ranks of the same kind, so scores never leave the device to be ranked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

Scores = np.ndarray | torch.Tensor


def _count_ahead(ahead: Scores) -> Scores:
    """Per-row count int64 [B] of the True entries of ahead bool [B, C]."""
    counts = ahead.sum(1)
    return counts if isinstance(counts, torch.Tensor) else counts.astype(np.int64)


def rank_among(scores: Scores, positive_column: int = 0) -> Scores:
    """Ranks int64 [B] of the positive in column `positive_column` of scores [B, C] among the row."""
    positive = scores[:, positive_column : positive_column + 1]
    ahead = scores >= positive
    ahead[:, positive_column] = False
    return _count_ahead(ahead)


def rank_in_full(scores: Scores, positives: Scores, excluded: Scores | None = None) -> Scores:
    """Ranks int64 [B] of item `positives[b]` among all items, scores [B, num_items + 1] (column 0
    is padding and never competes). `excluded` bool [B, num_items + 1] marks further items that do
    not compete in their row (the positive is ranked whether or not it is marked)."""
    if isinstance(scores, torch.Tensor):
        rows = torch.arange(scores.shape[0], device=scores.device)
        positives = torch.as_tensor(positives, dtype=torch.int64, device=scores.device)
    else:
        rows = np.arange(scores.shape[0])
    positive = scores[rows, positives][:, None]
    ahead = scores >= positive
    ahead[rows, positives] = False
    ahead[:, 0] = False
    if excluded is not None:
        ahead &= ~excluded
    return _count_ahead(ahead)


def case_values(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-case value (same shape as `ranks`) of metric ``"hr@k"``, ``"ndcg@k"``, ``"mrr"`` or
    ``"mrr@k"``: hit 0/1, gain 1/log2(rank + 2) within k (else 0), 1/(rank + 1), or 1/(rank + 1)
    within k (else 0). A rank of +inf (float ranks) is a positive that was not ranked at all:
    0 for every metric."""
    ranks = np.asarray(ranks)
    name, _, k_text = metric.partition("@")
    if name == "mrr" and not k_text:
        return 1.0 / (ranks + 1.0)
    if name not in ("hr", "ndcg", "mrr") or not k_text.isdigit():
        raise ValueError(f"unknown metric {metric!r}; expected 'hr@K', 'ndcg@K', 'mrr' or 'mrr@K'")
    within = ranks < int(k_text)
    if name == "hr":
        return within.astype(np.float64)
    gain = 1.0 / np.log2(ranks + 2.0) if name == "ndcg" else 1.0 / (ranks + 1.0)
    return np.where(within, gain, 0.0)


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


def metrics_of_lists(ranks: Sequence[int | None], k: int) -> dict[str, float]:
    """HR@k, NDCG@k, MRR cut at k (key ``"mrr"``: 1/(rank + 1) within k, else 0) and the count
    ``"n"`` of positives looked up in lists of (at most) k items: `ranks` 0-based, None where the
    positive is not in its list (a miss). For lists that were published, where a rank beyond k
    is unknown; `summarize` is for full rankings (MRR over every rank)."""
    values = np.array([np.inf if r is None else r for r in ranks], dtype=np.float64)
    return {
        f"hr@{k}": hit_rate(values, k),
        f"ndcg@{k}": ndcg(values, k),
        "mrr": _mean(case_values(values, f"mrr@{k}")),
        "n": int(values.size),
    }
