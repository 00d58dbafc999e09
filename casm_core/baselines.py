"""Non-learned baselines scored through the same harness as CASM."""

from __future__ import annotations

import numpy as np


class MostPopular:
    """Scores every item by its count in the training events, the same list for every user.
    `counts` [num_items + 1] (index 0, padding, never recommended)."""

    def __init__(self, counts: np.ndarray) -> None:
        scores = np.asarray(counts, dtype=np.float32).copy()
        scores[0] = -np.inf
        self.scores = scores

    def score_all(self, items: np.ndarray, behaviours: np.ndarray) -> np.ndarray:
        """Scores [B, num_items + 1] for B input sequences (which are ignored)."""
        return np.broadcast_to(self.scores, (items.shape[0], self.scores.size))

    def top_k(self, k: int) -> np.ndarray:
        """Indices of the `k` most popular items, most popular first."""
        k = min(k, self.scores.size - 1)
        best = np.argpartition(-self.scores, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
        return best[np.argsort(-self.scores[best], kind="stable")]
