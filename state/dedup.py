"""Memory of applied event ids, for dropping producer retries.

An id is remembered as a 64-bit hash (`hash_ids`, the same in every process and version)
plus the wall-clock time it was applied; ids older than the window are forgotten. The hashes live
in the DuckDB file too (`events.event_hash`, and `event_ids` for ids whose events were trimmed),
so the memory is rebuilt when the store opens. Two different ids collide with probability about
`remembered ids / 2**64` per new event (about 5e-12 with 10^8 ids remembered); a collision drops
the newer event as a duplicate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

_M1 = np.uint64(0x87C37B91114253D5)
_M2 = np.uint64(0x4CF5AD432745937F)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_SEED = np.uint64(0x9E3779B97F4A7C15)
_WORD = 8


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _fmix(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint64(33)
    h *= _MIX1
    h ^= h >> np.uint64(33)
    h *= _MIX2
    h ^= h >> np.uint64(33)
    return h


def hash_ids(ids: pa.Array | pa.ChunkedArray | Sequence[str]) -> np.ndarray:
    """Stable 64-bit hashes of non-null strings (signed, to fit DuckDB BIGINT), int64 [n].

    A MurmurHash3-style mix of the UTF-8 bytes, 8 at a time, vectorised over the strings; the
    same in every process and version of this code (the hashes are stored in the file).
    """
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids, pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.null_count:
        raise ValueError("hash_ids expects no nulls")
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32)[arr.offset: arr.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else None
    if data is None or data.size == 0:
        data = np.zeros(1, dtype=np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    width = max(_WORD, int(-(-int(lengths.max()) // _WORD) * _WORD))
    cols = np.arange(width, dtype=np.int64)
    inside = cols[None, :] < lengths[:, None]
    src = np.minimum(starts[:, None] + cols[None, :], data.size - 1)
    padded = np.where(inside, data[src], 0).astype(np.uint8)
    words = np.ascontiguousarray(padded).view("<u8").astype(np.uint64)
    h = np.full(n, _SEED, dtype=np.uint64) ^ (lengths.astype(np.uint64) * _M2)
    for j in range(words.shape[1]):
        # Only words that hold bytes of the string count, so a hash never depends on the
        # other strings of the call.
        k = words[:, j] * _M1
        k = _rotl(k, 31) * _M2
        mixed = _rotl(h ^ k, 27) * np.uint64(5) + np.uint64(0x52DCE729)
        h = np.where(lengths > j * _WORD, mixed, h)
    return _fmix(h).view(np.int64)


class EventIdIndex:
    """Set of remembered id hashes with the time each was applied (unix s).

    Log-structured: sorted runs whose sizes at least double from the newest to the oldest run
    (a new batch is a run; equal-sized neighbours merge), so adding costs O(log n) amortised per
    id and a lookup is one binary search per run (O(log^2 n)).
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, times), oldest first

    def __len__(self) -> int:
        return sum(int(h.size) for h, _ in self._runs)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Bool [n]: which hashes are remembered."""
        hashes = np.asarray(hashes, dtype=np.int64)
        found = np.zeros(hashes.size, dtype=bool)
        for run, _ in self._runs:
            pos = np.minimum(np.searchsorted(run, hashes), run.size - 1)
            found |= run[pos] == hashes
        return found

    def add(self, hashes: np.ndarray, applied_at: float | np.ndarray) -> None:
        """Remember `hashes`, applied at `applied_at` (unix s, scalar or [n])."""
        hashes = np.asarray(hashes, dtype=np.int64)
        if hashes.size == 0:
            return
        times = np.broadcast_to(np.asarray(applied_at, dtype=np.float64), hashes.shape)
        self._runs.append(_sorted_run(hashes, times))
        while len(self._runs) > 1 and self._runs[-2][0].size <= 2 * self._runs[-1][0].size:
            newer = self._runs.pop()
            older = self._runs.pop()
            self._runs.append(_sorted_run(np.concatenate([older[0], newer[0]]),
                                          np.concatenate([older[1], newer[1]])))

    def expire(self, cutoff: float) -> int:
        """Forget hashes applied before `cutoff` (unix s); returns how many were forgotten."""
        dropped = 0
        runs = []
        for hashes, times in self._runs:
            if times.size and times.min() >= cutoff:
                runs.append((hashes, times))
                continue
            keep = times >= cutoff
            dropped += int(keep.size - keep.sum())
            if keep.any():
                runs.append((hashes[keep], times[keep]))
        self._runs = runs
        return dropped


def _sorted_run(hashes: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted, duplicate-free run; of a hash seen twice the later entry wins (callers pass
    older entries first). The stable sort (timsort) merges two sorted runs in linear time."""
    order = np.argsort(hashes, kind="stable")
    hashes, times = hashes[order], times[order]
    last = np.r_[hashes[1:] != hashes[:-1], True]
    return hashes[last], times[last]
