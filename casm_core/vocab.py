"""A vocabulary that grows: external ids (strings) to dense 1-based indices (0 is padding).

In memory, for the trainer and the offline evaluation: `add` adopts new ids at once. The state
store keeps its own numbering with transactional growth (`state.vocab.StagedVocabulary`: new names
are staged until the batch's transaction commits); the trainer adopts the store's order as plain
ids (`Trainer.reindex_items`), never the store's class.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class Vocabulary:
    """Maps external ids to dense indices 1..n in order of first appearance; index 0 is padding.

    Indices never change once assigned, so embedding rows stay attached to their item while the
    vocabulary grows.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self.add(np.asarray(list(ids), dtype=object))

    def __len__(self) -> int:
        """Number of known ids (padding not counted)."""
        return len(self._ids)

    @property
    def table_size(self) -> int:
        """Rows an embedding table over this vocabulary needs: len + 1 for padding."""
        return len(self._ids) + 1

    def __contains__(self, external_id: object) -> bool:
        return external_id in self._index

    def ids(self) -> list[str]:
        """External ids in index order: ``ids()[i]`` has index ``i + 1``."""
        return list(self._ids)

    def id_of(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        """External ids of dense `indices` (each >= 1)."""
        return [self._ids[i - 1] for i in np.asarray(indices, dtype=np.int64).tolist()]

    def add(self, external_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Indices of `external_ids` (shape [n], int64), adding unknown ones in order of first
        appearance."""
        values = np.asarray(external_ids, dtype=object)
        if values.size == 0:
            return np.zeros(0, dtype=np.int64)
        uniques, first, inverse = np.unique(values.astype(str), return_index=True, return_inverse=True)
        codes = np.empty(len(uniques), dtype=np.int64)
        unknown = []
        for position, external_id in enumerate(uniques.tolist()):
            code = self._index.get(external_id)
            if code is None:
                unknown.append(position)
            else:
                codes[position] = code
        for position in sorted(unknown, key=lambda p: first[p]):
            external_id = str(uniques[position])
            self._ids.append(external_id)
            self._index[external_id] = len(self._ids)
            codes[position] = len(self._ids)
        return codes[inverse.reshape(-1)]

    def lookup(self, external_ids: Sequence[str] | np.ndarray, missing: int = 0) -> np.ndarray:
        """Indices of `external_ids` (int64 [n]); unknown ids get `missing`."""
        get = self._index.get
        return np.fromiter((get(str(x), missing) for x in external_ids), dtype=np.int64)
