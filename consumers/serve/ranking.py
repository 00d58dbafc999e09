"""The lists `casm serve` publishes, the same way for every recommender: each user's exclusions
(`serve.exclude_behaviours` within their stored window) and one top-K
(`casm_core.scoring.top_k_of_scores`) for the model, the baselines and the popularity fallback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from casm_core.baselines import MostPopular
from casm_core.scoring import items_with_behaviours, top_k_of_scores

#: One user's list: item indices int64 [n] (1-based, n <= k) and their scores float32 [n], best first.
RankedList = tuple[np.ndarray, np.ndarray]


class Ranker(Protocol):
    """What ranks users after their windows: `casm_core.scoring.Scorer`, a baseline of
    `casm_core.baselines` (`RecentItems`), or `PopularItems`."""

    @property
    def num_items(self) -> int: ...

    def top_k(
        self, items: np.ndarray, behaviours: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


def exclusions(
    items: np.ndarray, behaviours: np.ndarray, behaviour_names: Sequence[str], exclude_behaviours: Sequence[str]
) -> np.ndarray | None:
    """Items int64 [B, W] each user must not be recommended (0: none): those of their window
    items/behaviours [B, W] whose behaviour is in `exclude_behaviours`. None when nothing can be
    excluded (none configured, or none of them in `behaviour_names`, position i naming index i + 1)."""
    chosen = [behaviour_names.index(b) + 1 for b in exclude_behaviours if b in behaviour_names]
    if not chosen:
        return None
    return items_with_behaviours(items, behaviours, chosen)


def ranked_lists(
    ranker: Ranker, items: np.ndarray, behaviours: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> list[RankedList]:
    """Top-`k` per window items/behaviours [B, W] by `ranker`, never an item of that row of
    `exclude` [B, M]; a list is shorter than `k` when fewer items are left."""
    scores, best = ranker.top_k(items, behaviours, k, exclude)
    lists = []
    for row_scores, row_best in zip(scores, best, strict=True):
        finite = np.isfinite(row_scores)  # -inf: excluded items (or padding) filling a short list
        lists.append((row_best[finite], row_scores[finite]))
    return lists


class PopularItems:
    """`MostPopular` over `counts` [num_items + 1] as a `Ranker`: the score of an item is its
    count, for every user. The shared top-K is computed once per `k`; a user gets a top-K of
    their own only when one of their excluded items is in it (otherwise the shared list is their
    top-K as well), both by `top_k_of_scores`."""

    def __init__(self, counts: np.ndarray) -> None:
        self.baseline = MostPopular(counts)
        self._shared: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_items(self) -> int:
        return self.baseline.num_items

    def top_k(
        self, items: np.ndarray, behaviours: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `Scorer.top_k`: (scores float32 [B, k'], item indices int64 [B, k']), k' = min(k,
        num_items), best first; `exclude` [B, M] (0: none) per row; windows items [B, W] only
        give the number of rows."""
        if k not in self._shared:
            self._shared[k] = top_k_of_scores(self.baseline.scores[None, :].copy(), k)
        shared_scores, shared_best = self._shared[k]
        rows = items.shape[0]
        scores, best = np.repeat(shared_scores, rows, axis=0), np.repeat(shared_best, rows, axis=0)
        if exclude is not None and exclude.size:
            own = np.flatnonzero((np.isin(exclude, shared_best[0]) & (exclude > 0)).any(axis=1))
            if own.size:
                # score_all is a read-only broadcast; top_k_of_scores writes into its input.
                own_scores = np.array(self.baseline.score_all(items[own], behaviours[own]))
                scores[own], best[own] = top_k_of_scores(own_scores, k, exclude[own])
        return scores, best
