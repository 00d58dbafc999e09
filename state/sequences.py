"""Rolling per-user sequences held as dense numpy rows (the store's in-memory mirror).

Each known user owns one row of fixed width N (the sequence length): item and behaviour indices,
left-padded with 0, the newest event in the last column, exactly the layout the model reads.
Appending a batch is vectorised: the events are grouped per user (stable, so arrival order is
kept) and every touched row becomes `(old row ++ new events)[-N:]` in one gather.

The mirror is not the truth: the DuckDB file is (see `state.events`). It is rebuilt from the
file's snapshot table plus the events applied after the snapshot whenever the store is opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from state.vocab import encode

#: Rows added at once when the mirror grows (it doubles beyond this).
_MIN_CAPACITY = 1024
#: Users of a batch: names, an Arrow string array, or (codes [m], distinct names).
UserColumn = Sequence[str] | pa.Array | pa.ChunkedArray | tuple[np.ndarray, list[str]]
#: Sentinel for "no value" in the int64 per-user columns (unknown user, absent produced_ms).
MISSING = -1


@dataclass(frozen=True)
class Sequences:
    """Padded sequences of a list of users, aligned with `user_ids`.

    Attributes:
        user_ids: the users asked for, in the order asked.
        items: int64 [n, width], 1-based item indices, left-padded with 0, newest event last.
        behaviours: int64 [n, width], 1-based behaviour indices aligned with `items`.
        lengths: int64 [n], non-padding events per row (0 for an unknown user).
        n_events: int64 [n], events ever applied for the user (not capped by the width).
        last_topic: topic of the user's newest event (None for an unknown user).
        last_partition: int32-valued int64 [n], partition of the newest event (-1: unknown user).
        last_offset: int64 [n], Kafka offset of the newest event (-1: unknown user).
        last_timestamp: float64 [n], event time of the newest event, unix s (NaN: unknown user).
        last_produced_ms: int64 [n], Kafka record time of the newest event, ms (-1: unknown or
            not carried by the event).
    """

    user_ids: list[str]
    items: np.ndarray
    behaviours: np.ndarray
    lengths: np.ndarray
    n_events: np.ndarray
    last_topic: list[str | None]
    last_partition: np.ndarray
    last_offset: np.ndarray
    last_timestamp: np.ndarray
    last_produced_ms: np.ndarray

    def __len__(self) -> int:
        return len(self.user_ids)

    def __getitem__(self, name: str) -> object:
        """Dict-style access to a field (`seqs["items"]`)."""
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def keys(self) -> list[str]:
        """Names of the fields."""
        return [f.name for f in fields(self)]

    def as_dict(self) -> dict[str, object]:
        """The fields as a plain dict."""
        return {name: getattr(self, name) for name in self.keys()}


class RollingSequences:
    """Per-user rolling sequences of width `length` plus the newest event's coordinates.

    Rows are numbered in order of the users' first appearance. Columns (one entry per row):
    items int32 [rows, N], behaviours int16 [rows, N], lengths, n_events, first_seq, last_seq
    (store-wide arrival numbers), last_topic (index into `topics`), last_partition, last_offset,
    last_timestamp (unix s), last_produced_ms (-1 when absent). `dirty` marks rows changed since
    the last `clear_dirty`.
    """

    def __init__(self, length: int):
        if length < 1:
            raise ValueError(f"sequence length must be >= 1, got {length}")
        self.length = length
        self.user_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.topics: list[str] = []
        self.topic_index: dict[str, int] = {}
        self._alloc(0)

    # -- storage -------------------------------------------------------------------------------

    def _alloc(self, capacity: int) -> None:
        n = self.length
        self.items = np.zeros((capacity, n), dtype=np.int32)
        self.behaviours = np.zeros((capacity, n), dtype=np.int16)
        self.lengths = np.zeros(capacity, dtype=np.int32)
        self.n_events = np.zeros(capacity, dtype=np.int64)
        self.first_seq = np.zeros(capacity, dtype=np.int64)
        self.last_seq = np.zeros(capacity, dtype=np.int64)
        self.last_topic = np.zeros(capacity, dtype=np.int32)
        self.last_partition = np.zeros(capacity, dtype=np.int32)
        self.last_offset = np.zeros(capacity, dtype=np.int64)
        self.last_timestamp = np.zeros(capacity, dtype=np.float64)
        self.last_produced_ms = np.full(capacity, MISSING, dtype=np.int64)
        self.dirty = np.zeros(capacity, dtype=bool)

    _COLUMNS = (
        "items", "behaviours", "lengths", "n_events", "first_seq", "last_seq", "last_topic",
        "last_partition", "last_offset", "last_timestamp", "last_produced_ms", "dirty",
    )

    @property
    def capacity(self) -> int:
        return int(self.lengths.shape[0])

    def __len__(self) -> int:
        return len(self.user_ids)

    def _reserve(self, rows: int) -> None:
        if rows <= self.capacity:
            return
        new_capacity = max(_MIN_CAPACITY, self.capacity * 2, rows)
        old = {name: getattr(self, name) for name in self._COLUMNS}
        self._alloc(new_capacity)
        used = len(self.user_ids)
        for name, array in old.items():
            getattr(self, name)[:used] = array[:used]

    def topic_code(self, topic: str) -> int:
        """Index of `topic` in `topics`, adding it if new."""
        code = self.topic_index.get(topic)
        if code is None:
            code = len(self.topics)
            self.topics.append(topic)
            self.topic_index[topic] = code
        return code

    def rows_of(self, user_ids: Sequence[str]) -> np.ndarray:
        """Rows of `user_ids`, int64 [n]; -1 for users not held."""
        get = self.index.get
        return np.fromiter((get(u, -1) for u in user_ids), dtype=np.int64, count=len(user_ids))

    def _rows_creating(self, user_ids: UserColumn) -> np.ndarray:
        if isinstance(user_ids, tuple):
            codes, uniques = user_ids
        elif isinstance(user_ids, (pa.Array, pa.ChunkedArray)):
            codes, uniques = encode(user_ids)
        else:
            uniques = list(dict.fromkeys(user_ids))
            codes = None
        index = self.index
        get = index.get
        lut = np.fromiter((get(u, -1) for u in uniques), dtype=np.int64, count=len(uniques))
        missing = np.flatnonzero(lut < 0)
        if missing.size:
            start = len(self.user_ids)
            self._reserve(start + missing.size)
            new = [uniques[k] for k in missing.tolist()]
            for k, user in enumerate(new):
                index[user] = start + k
            self.user_ids.extend(new)
            lut[missing] = start + np.arange(missing.size)
        if codes is None:
            return np.fromiter((index[u] for u in user_ids), dtype=np.int64, count=len(user_ids))
        return lut[codes] if lut.size else np.zeros(0, dtype=np.int64)

    # -- writes --------------------------------------------------------------------------------

    def append(
        self,
        user_ids: UserColumn,
        items: np.ndarray,
        behaviours: np.ndarray,
        seq: np.ndarray,
        topic_codes: np.ndarray,
        partition: np.ndarray,
        offset: np.ndarray,
        timestamp: np.ndarray,
        produced_ms: np.ndarray,
    ) -> np.ndarray:
        """Append events (in arrival order) to their users' sequences.

        Args:
            user_ids: user of each event, [m]: a list, an Arrow string array, or already
                dictionary-encoded as (codes int64 [m], distinct users).
            items, behaviours: 1-based indices, [m].
            seq: store-wide arrival numbers, increasing, int64 [m].
            topic_codes: indices into `topics`, [m].
            partition, offset: Kafka coordinates, [m].
            timestamp: event time, unix s, float64 [m].
            produced_ms: Kafka record time (ms) or -1, int64 [m].

        Returns:
            The touched rows, in order of first appearance, int64 [k].
        """
        m = len(items)
        if m == 0:
            return np.zeros(0, dtype=np.int64)
        rows = self._rows_creating(user_ids)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        touched = sorted_rows[starts]
        counts = np.diff(np.r_[starts, m])
        lasts = order[starts + counts - 1]
        firsts = order[starts]

        # Row j becomes (old row ++ its new events)[-N:]: column t takes old column t + c_j
        # while that is < N, else new event t + c_j - N of the row. One flat gather from
        # [old rows ++ new events (grouped by row)] serves items and behaviours alike.
        n = self.length
        k = touched.size
        shift = np.arange(n, dtype=np.int64)[None, :] + counts[:, None]
        source = np.where(
            shift < n,
            np.arange(0, k * n, n, dtype=np.int64)[:, None] + shift,
            (k * n - n) + starts[:, None] + shift,
        ).ravel()
        new_items = np.asarray(items, dtype=np.int32)[order]
        new_behaviours = np.asarray(behaviours, dtype=np.int16)[order]
        self.items[touched] = np.concatenate([self.items[touched].ravel(), new_items])[
            source].reshape(k, n)
        self.behaviours[touched] = np.concatenate(
            [self.behaviours[touched].ravel(), new_behaviours])[source].reshape(k, n)
        self.lengths[touched] = np.minimum(self.lengths[touched] + counts, n)
        new_users = self.n_events[touched] == 0
        self.first_seq[touched[new_users]] = np.asarray(seq)[firsts[new_users]]
        self.n_events[touched] += counts
        self.last_seq[touched] = np.asarray(seq)[lasts]
        self.last_topic[touched] = np.asarray(topic_codes)[lasts]
        self.last_partition[touched] = np.asarray(partition)[lasts]
        self.last_offset[touched] = np.asarray(offset)[lasts]
        self.last_timestamp[touched] = np.asarray(timestamp)[lasts]
        self.last_produced_ms[touched] = np.asarray(produced_ms)[lasts]
        self.dirty[touched] = True
        return touched[np.argsort(firsts, kind="stable")]

    def load_rows(
        self,
        user_ids: Sequence[str],
        values_items: np.ndarray,
        values_behaviours: np.ndarray,
        list_offsets: np.ndarray,
        columns: dict[str, np.ndarray],
        topic_codes: np.ndarray,
    ) -> None:
        """Bulk-load snapshot rows for users not held yet (used when the store opens).

        Args:
            user_ids: [k] users, none of them held.
            values_items, values_behaviours: flattened list values of all rows, oldest first.
            list_offsets: int64 [k + 1], row r owns values [list_offsets[r], list_offsets[r+1]).
            columns: n_events, first_seq, last_seq, last_partition, last_offset,
                last_timestamp, last_produced_ms, each [k].
            topic_codes: [k] indices into `topics`.
        """
        k = len(user_ids)
        if k == 0:
            return
        rows = self._rows_creating(user_ids)
        if rows.size and (rows[0] != len(self.user_ids) - k or np.any(np.diff(rows) != 1)):
            raise ValueError("load_rows expects users that are not held yet")
        n = self.length
        lengths_full = np.diff(list_offsets)
        lengths = np.minimum(lengths_full, n)
        # value v of row r lands at column n - len_r + (v - start_r) when it is among the last n.
        row_of_value = np.repeat(np.arange(k), lengths_full)
        pos_in_row = np.arange(list_offsets[-1] - list_offsets[0]) - np.repeat(
            list_offsets[:-1] - list_offsets[0], lengths_full
        )
        column = n - lengths_full[row_of_value] + pos_in_row
        keep = column >= 0
        target_rows = rows[row_of_value[keep]]
        self.items[target_rows, column[keep]] = values_items[keep]
        self.behaviours[target_rows, column[keep]] = values_behaviours[keep]
        self.lengths[rows] = lengths
        for name, values in columns.items():
            getattr(self, name)[rows] = values
        self.last_topic[rows] = topic_codes

    def clear_dirty(self) -> None:
        """Mark every row as written to the snapshot."""
        self.dirty[:] = False

    def dirty_rows(self) -> np.ndarray:
        """Rows changed since the last `clear_dirty`, int64 [k]."""
        return np.flatnonzero(self.dirty[: len(self.user_ids)]).astype(np.int64)

    # -- reads ---------------------------------------------------------------------------------

    def gather(self, user_ids: Sequence[str], width: int | None = None) -> Sequences:
        """Padded sequences of `user_ids` (unknown users: all zeros, length 0).

        Args:
            user_ids: users, [n] (repeats allowed).
            width: columns of the result (default: the sequence length); a smaller width keeps
                the newest events, a larger one pads more on the left.
        """
        user_ids = list(user_ids)
        rows = self.rows_of(user_ids)
        return self.gather_rows(rows, width=width, user_ids=user_ids)

    def gather_rows(
        self, rows: np.ndarray, *, width: int | None = None, user_ids: list[str] | None = None
    ) -> Sequences:
        """As `gather`, for rows (-1 = unknown user)."""
        n = self.length
        width = n if width is None else int(width)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        rows = np.asarray(rows, dtype=np.int64)
        known = rows >= 0
        safe = np.where(known, rows, 0)
        count = rows.shape[0]
        items = np.zeros((count, width), dtype=np.int64)
        behaviours = np.zeros((count, width), dtype=np.int64)
        if count and len(self.user_ids):
            take = min(width, n)
            src_items = self.items[safe, n - take:]
            src_behaviours = self.behaviours[safe, n - take:]
            items[:, width - take:] = np.where(known[:, None], src_items, 0)
            behaviours[:, width - take:] = np.where(known[:, None], src_behaviours, 0)
        has_rows = len(self.user_ids) > 0

        def col(array: np.ndarray, fill: float | int, dtype: type) -> np.ndarray:
            if not has_rows:
                return np.full(count, fill, dtype=dtype)
            return np.where(known, array[safe], fill).astype(dtype)

        lengths = np.minimum(col(self.lengths, 0, np.int64), width)
        if user_ids is None:
            user_ids = [self.user_ids[r] if r >= 0 else "" for r in rows.tolist()]
        topic_codes = col(self.last_topic, -1, np.int64)
        return Sequences(
            user_ids=user_ids,
            items=items,
            behaviours=behaviours,
            lengths=lengths,
            n_events=col(self.n_events, 0, np.int64),
            last_topic=[self.topics[c] if c >= 0 else None for c in topic_codes.tolist()],
            last_partition=col(self.last_partition, MISSING, np.int64),
            last_offset=col(self.last_offset, MISSING, np.int64),
            last_timestamp=col(self.last_timestamp, np.nan, np.float64),
            last_produced_ms=col(self.last_produced_ms, MISSING, np.int64),
        )

    def row_lists(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sequences of `rows` as flattened lists (oldest first, padding removed).

        Returns:
            (list_offsets int32 [k + 1], items int32 [sum len], behaviours int16 [sum len]).
        """
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths[rows].astype(np.int64)
        offsets = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        mask = np.arange(self.length)[None, :] >= (self.length - lengths)[:, None]
        return (
            offsets.astype(np.int32),
            self.items[rows][mask],
            self.behaviours[rows][mask],
        )
