"""Dense 1-based vocabularies (items, behaviours) with staged growth.

Index 0 is padding; names are numbered in order of first appearance. `lookup` assigns indices to
new names without changing the vocabulary (they are staged), so an `apply` whose transaction
fails leaves it untouched; `commit` adopts what was staged. This is the store's vocabulary (the
numbering the tables hold); `casm_core.vocab.Vocabulary` is the in-memory one of the trainer and
the offline evaluation, which adopts new ids at once (no transaction to fail) and is given the
store's order as plain ids by `consumers/`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def encode(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Dictionary-encode a string column: (codes int64 [n], distinct values in order of first
    appearance)."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks() if encoded.num_chunks else pa.DictionaryArray.from_arrays(
            pa.array([], pa.int32()), pa.array([], pa.string()))
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, encoded.dictionary.to_pylist()


class StagedVocabulary:
    """Names <-> 1-based indices, growing only when a transaction commits: `lookup` stages new
    names (numbered after the known ones), `commit` adopts them."""

    def __init__(self, names: Sequence[str] = ()):
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        for name in names:
            self._add(name)

    def __len__(self) -> int:
        return len(self.names)

    def _add(self, name: str) -> int:
        idx = self.index.get(name)
        if idx is None:
            self.names.append(name)
            idx = len(self.names)
            self.index[name] = idx
        return idx

    def get(self, name: str) -> int | None:
        """Index of `name`, None if unknown."""
        return self.index.get(name)

    def lookup(self, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Indices of `names`, staging unknown ones (first appearance order).

        Returns:
            (indices int64 [n], the new names in the order they were numbered).
        """
        get = self.index.get
        out = np.fromiter((get(name, 0) for name in names), dtype=np.int64, count=len(names))
        missing = np.flatnonzero(out == 0)
        if missing.size == 0:
            return out, []
        new: dict[str, int] = {}
        base = len(self.names)
        for k in missing.tolist():
            name = names[k]
            idx = new.get(name)
            if idx is None:
                idx = base + len(new) + 1
                new[name] = idx
            out[k] = idx
        return out, list(new)

    def lookup_array(self, names: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
        """`lookup` for an Arrow string column (looks each distinct name up once)."""
        codes, uniques = encode(names)
        idx, new = self.lookup(uniques)
        return idx[codes], new

    def commit(self, new_names: Sequence[str]) -> None:
        """Adopt names staged by `lookup` (in the order returned)."""
        for name in new_names:
            self._add(name)
