"""Non-learned baselines scored through the same harness as CASM: every baseline maps left-padded
sequences items/behaviours [B, W] to scores [B, num_items + 1] (column 0, padding, is -inf), so
the offline protocol, full ranking and the live publisher rank them exactly as they rank CASM."""

from __future__ import annotations

import numpy as np

from casm_core.scoring import top_k_of_scores


def _fill_scores(counts: np.ndarray) -> np.ndarray:
    """Popularity as scores in [0, 1): more frequent is higher; row 0 (padding) is -inf."""
    counts = np.asarray(counts, dtype=np.float64)
    scores = (counts / (counts[1:].max(initial=0.0) + 1.0)).astype(np.float32)
    scores[0] = -np.inf
    return scores


class MostPopular:
    """Scores every item by its count in the training events, the same list for every user.
    `counts` [num_items + 1] (index 0, padding, never recommended). Its top-K, like every
    recommender's, is `casm_core.scoring.top_k_of_scores` of these scores."""

    def __init__(self, counts: np.ndarray) -> None:
        scores = np.asarray(counts, dtype=np.float32).copy()
        scores[0] = -np.inf
        self.scores = scores

    @property
    def num_items(self) -> int:
        return self.scores.size - 1

    def score_all(self, items: np.ndarray, behaviours: np.ndarray) -> np.ndarray:
        """Scores [B, num_items + 1] for B input sequences (which are ignored)."""
        return np.broadcast_to(self.scores, (items.shape[0], self.scores.size))


class RecentItems:
    """The "recently seen items" rule: the items of the user's window, the most recently seen
    first, then the most popular items to fill the list. An item's recency is the position of
    its newest occurrence; positions are distinct, so a window item never ties with another
    window item, and every window item ranks above every item outside the window.

    Scores: window items get ``1 + p`` with p the 1-based position of their newest occurrence
    counted from the left of the [B, W] window (the newest event has p = W), other items their
    popularity scaled into [0, 1). `counts` [num_items + 1] are the popularity counts."""

    def __init__(self, counts: np.ndarray) -> None:
        self.fill = _fill_scores(counts)

    @property
    def num_items(self) -> int:
        return self.fill.size - 1

    def score_all(self, items: np.ndarray, behaviours: np.ndarray) -> np.ndarray:
        """Scores float32 [B, num_items + 1] after sequences items [B, W] (behaviours unused;
        items beyond the vocabulary are ignored)."""
        items = np.asarray(items, dtype=np.int64)
        batch, width = items.shape
        scores = np.repeat(self.fill[None, :], batch, axis=0)
        rows = np.broadcast_to(np.arange(batch)[:, None], items.shape)
        positions = np.broadcast_to(np.arange(1, width + 1, dtype=np.float32)[None, :], items.shape)
        real = (items > 0) & (items <= self.num_items)
        # Left to right, so the newest occurrence of an item is the value that stays.
        newest = np.zeros_like(scores)
        np.maximum.at(newest, (rows[real], items[real]), positions[real])
        seen = newest > 0
        scores[seen] = 1.0 + newest[seen]
        return scores

    def top_k(
        self, items: np.ndarray, behaviours: np.ndarray, k: int, exclude: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best `k` items per sequence, as `Scorer.top_k`: (scores [B, k], items [B, k])."""
        return top_k_of_scores(self.score_all(items, behaviours), k, exclude)
