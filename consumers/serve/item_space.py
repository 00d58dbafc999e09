"""Item indices of a model published by another process (scale-out), against the store's own.

An ingest instance numbers items in its store by first appearance *there*; the trainer numbers
them in its own store, which holds every partition, and publishes that vocabulary with each
version (the trainer owns the item index: one writer, no coordination, dense indices the model's
embedding table needs). Serving translates: the version's items keep the version's indices, the
store's items the version does not know yet follow them (scored by the repeat term only, as a
live store's new items always are: `Scorer.with_catalogue`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ItemSpace:
    """The index space of one model version extended by a store's other items.

    Attributes:
        ids: item id of space index i at ``ids[i - 1]`` (the version's items first).
        local_to_space: int64 [store items + 1]: a store index's space index (0 stays padding).
    """

    def __init__(self, model_items: Sequence[str]) -> None:
        self.model_items = len(model_items)
        self.ids: list[str] = list(model_items)
        self._index = {item: i + 1 for i, item in enumerate(self.ids)}
        self.local_to_space = np.zeros(1, dtype=np.int64)

    def extend(self, store_items: Sequence[str]) -> None:
        """Map the store's items past those mapped already (`store_items`: the store's whole
        vocabulary, in index order; it only grows)."""
        known = self.local_to_space.size - 1
        if len(store_items) <= known:
            return
        added = np.empty(len(store_items) - known, dtype=np.int64)
        for k, item in enumerate(store_items[known:]):
            space = self._index.get(item)
            if space is None:
                self.ids.append(item)
                space = self._index[item] = len(self.ids)
            added[k] = space
        self.local_to_space = np.concatenate([self.local_to_space, added])

    def items(self, local: np.ndarray) -> np.ndarray:
        """Store indices (any shape, within the mapped vocabulary) as space indices."""
        return self.local_to_space[local]

    def counts(self, local_counts: np.ndarray) -> np.ndarray:
        """Per-item counts indexed by store index [n + 1] re-indexed by space index [len(ids) + 1]."""
        out = np.zeros(len(self.ids) + 1, dtype=local_counts.dtype)
        n = min(local_counts.size, self.local_to_space.size)
        out[self.local_to_space[:n]] = local_counts[:n]
        out[0] = 0
        return out
