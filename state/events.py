"""`EventStore`: applied events, exactly once, and the in-memory mirror read from them.

Exactly-once across crashes
---------------------------
Kafka delivers at least once: after a crash the consumer seeks to the offsets the store holds and
messages are delivered again. `apply(events, offsets)` therefore writes, in **one DuckDB
transaction**, the accepted events, the vocabulary growth and the next offset to read of every
(topic, partition) of the batch. After a crash the file holds either all of a batch or none of it,
and its offsets say exactly where the applied events end. Two rules drop what was applied before:

* **By offset** (redelivery): an event whose `offset` is below the stored next offset of its
  (topic, partition) was applied already and is dropped, with or without an `event_id`.
* **By event id** (producer retries, which Kafka stores again at a *new* offset): an event whose
  `event_id` was applied within the last `event_id_window_s` seconds (wall clock) is dropped, as
  is a repeat of an id earlier in the same batch (the first one wins). **Events without an
  `event_id` are deduplicated by offset only.** The id memory is kept in the file
  (`events.event_hash`, and the `event_ids` table for ids whose events were trimmed).

Stored offsets never move backwards (except through `reset_offset`); `offsets` may run past the
last event of the batch (dead letters advance it too) and is recorded even for an empty batch.

What `apply` checks
-------------------
The rows were validated once, when the stream leaf decoded them (ids, lengths, timestamps,
known behaviours). `apply` trusts that and checks only, per column, that the columns it needs are
there with their types and without nulls, plus its own invariants: Kafka order within a
partition, the `offsets` map, a closed behaviour vocabulary, new behaviour names that fit, and
the vocabularies' index types (int16 behaviours, int32 items).

The mirror
----------
The file is the truth; this object holds what is read often, rebuilt from the file on every
open: the vocabularies (dicts), the offsets, the id memory (16 bytes per id), item popularity
and every user's rolling sequence as dense numpy rows (6 bytes x N per user). `apply` only
*appends* to the file (events, commit rows, new vocabulary); per-user sequences and popularity
are persisted as snapshot tables brought up to date ("folded") every `fold_events` applied
events, in their own transaction: the state is the snapshot plus the events applied after it
(`counters.folded_seq`), and opening the file replays those.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from state.database import Database
from state.dedup import EventIdIndex, hash_ids
from state.errors import ConfigMismatchError, InvalidEventError
from state.sequences import MISSING, RollingSequences, Sequences
from state.validate import (
    behaviour_names_ok,
    check_kafka_order,
    normalize_events,
    normalize_offsets,
    refuse_rows,
)
from state.vocab import StagedVocabulary, encode

log = logging.getLogger(__name__)

_EVENT_COLUMNS = (
    'seq, batch_seq, applied_at, topic, "partition", "offset", user_id, item_idx, behaviour_idx, '
    "timestamp, event_id, event_hash, produced_ms"
)
_USER_COLUMNS = (
    'user_id, topic, "partition", items, behaviours, n_events, first_seq, last_seq, '
    "last_timestamp, last_offset, last_produced_ms"
)
_COMMIT_COLUMNS = 'batch_seq, applied_at, topic, "partition", next_offset, n_applied, n_duplicates'
#: Index types of the vocabularies in the file (behaviour_idx SMALLINT, item_idx INTEGER).
_BEHAVIOUR_DTYPE = np.int16
_ITEM_DTYPE = np.int32


@dataclass(frozen=True)
class ApplyResult:
    """What one `apply` did.

    Attributes:
        applied: events written.
        duplicate_offsets: events dropped because their offset was below the stored next offset.
        duplicate_event_ids: events dropped because their event_id was applied before.
        touched_users: users with applied events, in order of first appearance.
        new_items: items added to the vocabulary.
        new_behaviours: behaviour names added (open vocabulary only).
        offsets: stored next offset of every (topic, partition) of the batch or of `offsets`.
        batch_seq: number of this apply in the store; None when nothing was written.
        rows: int64 [k], positions of the input rows that were applied (not redeliveries or
            duplicates), increasing.

    Filled only when `apply` was asked with `before_width=L` (else None), all aligned with the
    input rows (n of them), so a caller need not read the store again for this batch:
        user_ids: the batch's distinct users (all rows), in order of first appearance, [u].
        user_codes: int64 [n], each input row's position in `user_ids`.
        before_items, before_behaviours: int64 [u, L], the users' stored windows *before* this
            batch, left-padded with 0, newest last (the layout of `sequences`).
        item_idx, behaviour_idx: int64 [n], each row's dense index after the batch (new items
            numbered); 0 where the row was not applied.
    """

    applied: int
    duplicate_offsets: int
    duplicate_event_ids: int
    touched_users: list[str]
    new_items: int
    new_behaviours: list[str]
    offsets: dict[tuple[str, int], int]
    batch_seq: int | None
    rows: np.ndarray
    user_ids: list[str] | None = None
    user_codes: np.ndarray | None = None
    before_items: np.ndarray | None = None
    before_behaviours: np.ndarray | None = None
    item_idx: np.ndarray | None = None
    behaviour_idx: np.ndarray | None = None

    @property
    def duplicates(self) -> int:
        """Events dropped as already applied (by offset or by event id)."""
        return self.duplicate_offsets + self.duplicate_event_ids


@dataclass(frozen=True)
class UserActivity:
    """Every held user's sequence length and recency, aligned with `user_ids`.

    Attributes:
        user_ids: users in order of first appearance, [u].
        lengths: int64 [u], events in each user's rolling sequence (at most N).
        last_seq: int64 [u], store-wide arrival number of each user's newest event (higher is
            more recent).
    """

    user_ids: list[str]
    lengths: np.ndarray
    last_seq: np.ndarray


@dataclass
class _Counters:
    last_seq: int = 0
    batch_seq: int = 0
    folded_seq: int = 0
    popularity_rows: int = 0
    popularity_rows_aggregated: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Partitions:
    """The batch's (topic, partition) pairs: `pairs[inverse[r]]` is row r's, `batch_max` the
    highest offset of each pair in the batch, `stored` each pair's stored next offset."""

    topic_names: list[str]
    topic_idx: np.ndarray
    partition: np.ndarray
    offset: np.ndarray
    pairs: list[tuple[str, int]]
    inverse: np.ndarray
    batch_max: np.ndarray
    stored: np.ndarray


@dataclass(frozen=True)
class _Selection:
    """Which rows are applied: `fresh` (not below the stored offset), `rows` (positions of the
    applied rows), `has_id` / `event_hash` per input row."""

    fresh: np.ndarray
    rows: np.ndarray
    has_id: np.ndarray
    event_hash: np.ndarray

    @property
    def duplicate_offsets(self) -> int:
        return int(self.fresh.size - self.fresh.sum())

    @property
    def duplicate_event_ids(self) -> int:
        return int(self.fresh.sum() - self.rows.size)


@dataclass(frozen=True)
class _Encoded:
    """The applied rows in the store's numbering."""

    users: tuple[np.ndarray, list[str]]
    item_idx: np.ndarray
    behaviour_idx: np.ndarray
    new_items: list[str]
    new_behaviours: list[str]


@dataclass(frozen=True)
class _Before:
    """The batch's users and their windows before the batch (for `ApplyResult`)."""

    user_ids: list[str]
    user_codes: np.ndarray
    items: np.ndarray
    behaviours: np.ndarray


class EventStore:
    """Applied events, offsets, vocabularies, popularity, id memory and rolling sequences.

    Args:
        db: the open file.
        behaviours: configured behaviour vocabulary, in index order. The file's vocabulary must
            start with it, or it must start with the file's (the rest is added).
        sequence_length: N, events kept per user (the newest N).
        open_vocabulary: accept unknown behaviours (appended) instead of refusing the batch.
        max_id_length: longest behaviour name (characters) the vocabulary takes.
        event_id_window_s: seconds an applied event_id is remembered (wall clock).
        fold_events: applied events between two folds of the snapshot tables.
        clock: wall clock (unix s).

    Raises:
        ConfigMismatchError: `behaviours` contradicts the file's vocabulary.
    """

    def __init__(
        self,
        db: Database,
        *,
        behaviours: Sequence[str],
        sequence_length: int,
        open_vocabulary: bool,
        max_id_length: int,
        event_id_window_s: float,
        fold_events: int,
        clock: Callable[[], float] = time.time,
    ):
        behaviour_names_ok(list(behaviours), max_id_length)
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        if fold_events < 1 or event_id_window_s <= 0 or max_id_length < 1:
            raise ValueError("fold_events, event_id_window_s and max_id_length must be positive")
        self.db = db
        self.sequence_length = int(sequence_length)
        self.open_vocabulary = open_vocabulary
        self.max_id_length = int(max_id_length)
        self.event_id_window_s = float(event_id_window_s)
        self.fold_events = int(fold_events)
        self._configured_behaviours = list(behaviours)
        self._clock = clock
        # Readers of the in-memory mirror take only this lock; writers hold the database lock
        # throughout and this one only while they change the mirror, so a read never waits for
        # a DuckDB write (order: database lock, then this one).
        self._mirror = threading.RLock()
        with db.lock:
            self._load()

    # -- loading the mirror --------------------------------------------------------------------

    def _load(self) -> None:
        """(Re)build the mirror from the file."""
        with self._mirror:
            self._load_mirror()

    def _load_mirror(self) -> None:
        con = self.db.con
        self._behaviours = self._load_behaviours(con)
        items = con.sql("SELECT item_id FROM items ORDER BY idx").to_arrow_table()
        self._items = StagedVocabulary(items.column(0).to_pylist())
        self._counters = self._load_counters(con)
        self._popularity = np.zeros((len(self._items) + 1, len(self._behaviours) + 1), np.int64)
        pop = con.sql(
            "SELECT item_idx, behaviour_idx, sum(count)::BIGINT FROM popularity GROUP BY ALL"
        ).fetchnumpy()
        if len(pop["item_idx"]):
            np.add.at(self._popularity, (pop["item_idx"], pop["behaviour_idx"]),
                      list(pop.values())[2])
        self._users = RollingSequences(self.sequence_length)
        self._load_snapshot(con)
        self._replay_pending(con)
        self._dedup = EventIdIndex()
        ids = con.execute(
            "SELECT event_hash, applied_at FROM events "
            "WHERE event_hash IS NOT NULL AND applied_at >= $1 "
            "UNION ALL SELECT event_hash, applied_at FROM event_ids WHERE applied_at >= $1",
            [self.id_window_start()],
        ).fetchnumpy()
        self._dedup.add(ids["event_hash"], ids["applied_at"])
        c = self._counters
        log.info(
            "state file %s: %d users, %d items, %d behaviours, %d partitions, %d events after "
            "the snapshot replayed, %d event ids remembered",
            self.db.path, len(self._users), len(self._items), len(self._behaviours),
            len(c.offsets), c.last_seq - c.folded_seq, len(self._dedup),
        )

    def _load_counters(self, con: duckdb.DuckDBPyConnection) -> _Counters:
        counters = con.execute("SELECT folded_seq, batch_seq FROM counters").fetchall()[0]
        max_seq = con.execute("SELECT max(seq) FROM events").fetchall()[0][0]
        max_batch = con.execute("SELECT max(batch_seq) FROM commits").fetchall()[0][0]
        c = _Counters()
        c.folded_seq = int(counters[0])
        c.last_seq = max(c.folded_seq, int(max_seq or 0))
        c.batch_seq = max(int(counters[1]), int(max_batch or 0))
        rows = con.execute(
            'SELECT topic, "partition", max(next_offset) FROM commits GROUP BY ALL'
        ).fetchall()
        c.offsets = {(t, int(p)): int(o) for t, p, o in rows}
        # A reset (`reset_offset`) lowers a partition's offset: from the newest reset on, the
        # offset is the reset's target or a later commit's, whichever is higher.
        resets = con.execute(
            'SELECT topic, "partition", max(batch_seq), arg_max(to_offset, batch_seq) '
            "FROM offset_resets GROUP BY ALL"
        ).fetchall()
        for t, p, reset_seq, to_offset in resets:
            later = con.execute(
                'SELECT max(next_offset) FROM commits WHERE topic = $1 AND "partition" = $2 '
                "AND batch_seq > $3",
                [t, p, reset_seq],
            ).fetchall()[0][0]
            c.offsets[(t, int(p))] = max(int(to_offset), int(later) if later is not None else 0)
            c.batch_seq = max(c.batch_seq, int(reset_seq))
        c.popularity_rows = int(con.execute("SELECT count(*) FROM popularity").fetchall()[0][0])
        c.popularity_rows_aggregated = c.popularity_rows
        return c

    def _load_behaviours(self, con: duckdb.DuckDBPyConnection) -> StagedVocabulary:
        stored = [r[0] for r in con.execute("SELECT name FROM behaviours ORDER BY idx").fetchall()]
        configured = self._configured_behaviours
        if stored[: len(configured)] == configured:
            names = stored
        elif configured[: len(stored)] == stored:
            names = configured
            if not self.db.read_only:
                extra = configured[len(stored):]
                self.db.transaction(lambda c: c.executemany(
                    "INSERT INTO behaviours VALUES (?, ?)",
                    [[len(stored) + k + 1, name] for k, name in enumerate(extra)],
                ))
        else:
            raise ConfigMismatchError(
                f"state file {self.db.path} numbers behaviours as {stored}, the configured "
                f"vocabulary is {configured}; indices would change. Configure the file's order "
                "(new names may only be appended) or use another file"
            )
        return StagedVocabulary(names)

    def _load_snapshot(self, con: duckdb.DuckDBPyConnection) -> None:
        snap = con.sql(
            f"SELECT {_USER_COLUMNS} FROM users ORDER BY first_seq, user_id"
        ).to_arrow_table()
        if snap.num_rows == 0:
            return
        items = snap.column("items").combine_chunks()
        behaviours = snap.column("behaviours").combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64)
        self._users.load_rows(
            snap.column("user_id").to_pylist(),
            pc.list_flatten(items).to_numpy(),
            pc.list_flatten(behaviours).to_numpy(),
            offsets - offsets[0],
            {
                "n_events": snap.column("n_events").to_numpy(),
                "first_seq": snap.column("first_seq").to_numpy(),
                "last_seq": snap.column("last_seq").to_numpy(),
                "last_partition": snap.column("partition").to_numpy(),
                "last_offset": snap.column("last_offset").to_numpy(),
                "last_timestamp": snap.column("last_timestamp").to_numpy(),
                "last_produced_ms": snap.column("last_produced_ms").fill_null(MISSING).to_numpy(),
            },
            self._topic_codes(snap.column("topic")),
        )

    def _topic_codes(self, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(column)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        lut = np.array([self._users.topic_code(t) for t in encoded.dictionary.to_pylist()],
                       dtype=np.int32)
        return lut[encoded.indices.to_numpy(zero_copy_only=False)] if len(lut) else np.zeros(
            len(encoded), dtype=np.int32)

    def _replay_pending(self, con: duckdb.DuckDBPyConnection) -> None:
        pending = con.sql(
            'SELECT user_id, item_idx, behaviour_idx, seq, topic, "partition", "offset", '
            f"timestamp, produced_ms FROM events WHERE seq > {self._counters.folded_seq} "
            "ORDER BY seq"
        ).to_arrow_table()
        if pending.num_rows == 0:
            return
        items = pending.column("item_idx").to_numpy()
        behaviours = pending.column("behaviour_idx").to_numpy()
        self._users.append(
            pending.column("user_id").to_pylist(),
            items,
            behaviours,
            pending.column("seq").to_numpy(),
            self._topic_codes(pending.column("topic")),
            pending.column("partition").to_numpy(),
            pending.column("offset").to_numpy(),
            pending.column("timestamp").to_numpy(),
            pending.column("produced_ms").fill_null(MISSING).to_numpy(),
        )
        np.add.at(self._popularity, (items, behaviours), 1)

    # -- apply ---------------------------------------------------------------------------------

    def apply(
        self,
        events: pa.Table,
        offsets: Mapping[tuple[str, int], int] | None = None,
        *,
        before_width: int | None = None,
    ) -> ApplyResult:
        """Apply a batch of events and record the consumed offsets, in one transaction.

        Args:
            events: columns user_id, item_id, behavior (str), timestamp (float64, unix s), topic
                (str), partition (int32), offset (int64), optional event_id (str, nullable) and
                produced_ms (int64, nullable), as decoded by the stream leaf. Row order is
                arrival order.
            offsets: next offset to read per (topic, partition) after this batch; may run past
                the batch's last event; partitions of the batch that are absent get their last
                event's offset + 1. Recorded even when `events` is empty.
            before_width: L; when given, the result also says which rows were applied, the
                batch's users with their windows of width L before the batch, and each row's
                dense indices (see `ApplyResult`).

        Returns:
            What was applied and dropped (see `ApplyResult`).

        Raises:
            InvalidEventError: a required column is missing, null or of a type that cannot be
                read; offsets do not increase within a partition; `offsets` is malformed or not
                above an event of the batch; an unknown behaviour (closed vocabulary), a new
                behaviour name that is empty or longer than `max_id_length`, or a vocabulary
                past its index type. Nothing is written.
            StoreError: the write failed; nothing is written.
        """
        if before_width is not None and before_width < 1:
            raise ValueError(f"before_width must be >= 1, got {before_width}")
        with self.db.lock:
            self.db.writable()
            result = self._apply(events, offsets or {}, before_width)
            if self._counters.last_seq - self._counters.folded_seq >= self.fold_events:
                self._fold()
            return result

    def _apply(self, events: pa.Table, offsets: Mapping[tuple[str, int], int],
               before_width: int | None) -> ApplyResult:
        table = normalize_events(events)
        check_kafka_order(table)
        wanted = normalize_offsets(offsets)
        now = float(self._clock())
        parts = self._partitions(table, wanted)
        chosen = self._select(table, parts)
        new_offsets, commit_rows = self._next_offsets(parts, chosen, wanted)
        before = None if before_width is None else self._before(table, before_width)
        if not commit_rows and chosen.rows.size == 0:
            return self._result(table, chosen, None, new_offsets, None, before)
        taken = table if chosen.rows.size == table.num_rows else table.take(pa.array(chosen.rows))
        encoded = self._encode(taken, chosen.rows)
        c = self._counters
        seq = c.last_seq + 1 + np.arange(chosen.rows.size, dtype=np.int64)
        batch_seq = c.batch_seq + 1
        self._write(taken, chosen, encoded, commit_rows, seq, batch_seq, now)
        self._advance_mirror(taken, parts, chosen, encoded, new_offsets, seq, batch_seq, now)
        return self._result(table, chosen, encoded, new_offsets, batch_seq, before)

    def _partitions(self, table: pa.Table, wanted: dict[tuple[str, int], int]) -> _Partitions:
        """Group the rows by (topic, partition); refuse an `offsets` value at or below an event
        of the batch."""
        partition = table.column("partition").to_numpy()
        offset = table.column("offset").to_numpy()
        topic_enc = table.column("topic").dictionary_encode().combine_chunks()
        topic_names = topic_enc.dictionary.to_pylist()
        topic_idx = topic_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        key = (topic_idx << 32) | partition.astype(np.int64)
        keys, inverse = np.unique(key, return_inverse=True)
        pairs = [(topic_names[int(k) >> 32], int(k) & 0xFFFFFFFF) for k in keys]
        batch_max = np.full(len(pairs), -1, dtype=np.int64)
        np.maximum.at(batch_max, inverse, offset)
        for p, pair in enumerate(pairs):
            if pair in wanted and wanted[pair] <= batch_max[p]:
                rows = np.flatnonzero(inverse == p)
                raise InvalidEventError(
                    f"offsets{pair} = {wanted[pair]} is not above the batch's offset "
                    f"{int(batch_max[p])} on that partition; nothing written",
                    rows=rows, reasons=["offset at or past the recorded next offset"] * rows.size,
                )
        stored = np.array([self._counters.offsets.get(pair, 0) for pair in pairs], dtype=np.int64)
        return _Partitions(topic_names, topic_idx, partition, offset, pairs,
                           inverse.reshape(-1), batch_max, stored)

    def _select(self, table: pa.Table, parts: _Partitions) -> _Selection:
        """Drop rows below their partition's stored offset, repeats of an id within the batch
        and ids the memory holds."""
        n = table.num_rows
        fresh = parts.offset >= parts.stored[parts.inverse] if n else np.zeros(0, dtype=bool)
        event_hash = np.zeros(n, dtype=np.int64)
        id_column = table.column("event_id")
        has_id = ~id_column.is_null().to_numpy(zero_copy_only=False) & fresh
        with_id = np.flatnonzero(has_id)
        accepted = fresh.copy()
        if with_id.size:
            hashes = hash_ids(id_column.take(pa.array(with_id)))
            event_hash[with_id] = hashes
            first = np.zeros(with_id.size, dtype=bool)
            first[np.unique(hashes, return_index=True)[1]] = True
            accepted[with_id[~first | self._dedup.contains(hashes)]] = False
        return _Selection(fresh, np.flatnonzero(accepted).astype(np.int64), has_id, event_hash)

    def _next_offsets(
        self, parts: _Partitions, chosen: _Selection, wanted: dict[tuple[str, int], int]
    ) -> tuple[dict[tuple[str, int], int], list[tuple[str, int, int, int, int]]]:
        """Each pair's next offset after the batch, and the commit rows to write (pairs whose
        offset moves or that applied events): (topic, partition, next, applied, duplicates)."""
        applied_per_pair = np.bincount(parts.inverse[chosen.rows], minlength=len(parts.pairs))
        seen_per_pair = np.bincount(parts.inverse, minlength=len(parts.pairs))
        position = {pair: p for p, pair in enumerate(parts.pairs)}
        new_offsets: dict[tuple[str, int], int] = {}
        commit_rows: list[tuple[str, int, int, int, int]] = []
        for pair in dict.fromkeys([*parts.pairs, *wanted]):
            current = self._counters.offsets.get(pair)
            p = position.get(pair, -1)
            target = max(
                current if current is not None else 0,
                wanted.get(pair, 0),
                int(parts.batch_max[p]) + 1 if p >= 0 else 0,
            )
            new_offsets[pair] = target
            applied_p = int(applied_per_pair[p]) if p >= 0 else 0
            if target != current or applied_p:
                dup_p = int(seen_per_pair[p]) - applied_p if p >= 0 else 0
                commit_rows.append((pair[0], pair[1], target, applied_p, dup_p))
        return new_offsets, commit_rows

    def _before(self, table: pa.Table, width: int) -> _Before:
        """The batch's users and their windows as stored now (before the batch)."""
        codes, uniques = encode(table.column("user_id"))
        stored = self._users.gather(uniques, width=width)
        return _Before(uniques, codes, stored.items, stored.behaviours)

    def _encode(self, taken: pa.Table, rows: np.ndarray) -> _Encoded:
        """Number the applied rows' users, items and behaviours (new names staged, not yet
        adopted); refuse what the vocabularies cannot take."""
        behaviour_idx, new_behaviours = self._behaviours.lookup_array(taken.column("behavior"))
        if new_behaviours:
            base = len(self._behaviours)
            if not self.open_vocabulary:
                raise refuse_rows(rows[behaviour_idx > base], "unknown behavior " + ", ".join(
                    repr(b) for b in new_behaviours))
            unfit = [base + 1 + k for k, b in enumerate(new_behaviours)
                     if not b or len(b) > self.max_id_length]
            if unfit:
                raise refuse_rows(rows[np.isin(behaviour_idx, unfit)],
                                  f"behavior is empty or longer than {self.max_id_length} "
                                  "characters")
        item_idx, new_items = self._items.lookup_array(taken.column("item_id"))
        for vocab, new, kind, dtype in (
            (self._behaviours, new_behaviours, "behaviour", _BEHAVIOUR_DTYPE),
            (self._items, new_items, "item", _ITEM_DTYPE),
        ):
            if len(vocab) + len(new) > np.iinfo(dtype).max:
                raise InvalidEventError(
                    f"the {kind} vocabulary would exceed {np.iinfo(dtype).max} entries; "
                    "nothing written"
                )
        return _Encoded(encode(taken.column("user_id")), item_idx, behaviour_idx,
                        new_items, new_behaviours)

    def _write(self, taken: pa.Table, chosen: _Selection, encoded: _Encoded,
               commit_rows: list[tuple[str, int, int, int, int]], seq: np.ndarray,
               batch_seq: int, now: float) -> None:
        """Append the new vocabulary, the events and the commit rows in one transaction."""
        m = seq.size
        inserts: list[tuple[str, str, pa.Table]] = []
        if encoded.new_behaviours:
            base = len(self._behaviours)
            inserts.append(("behaviours", "idx, name", pa.table({
                "idx": pa.array(range(base + 1, base + 1 + len(encoded.new_behaviours)),
                                pa.int16()),
                "name": pa.array(encoded.new_behaviours, pa.string()),
            })))
        if encoded.new_items:
            base = len(self._items)
            inserts.append(("items", "idx, item_id, first_seq", pa.table({
                "idx": pa.array(np.arange(base + 1, base + 1 + len(encoded.new_items)), pa.int32()),
                "item_id": pa.array(encoded.new_items, pa.string()),
                "first_seq": seq[_first_positions(encoded.item_idx, base)],
            })))
        if m:
            inserts.append(("events", _EVENT_COLUMNS, pa.table({
                "seq": seq,
                "batch_seq": np.full(m, batch_seq, dtype=np.int64),
                "applied_at": np.full(m, now),
                "topic": taken.column("topic"),
                "partition": taken.column("partition"),
                "offset": taken.column("offset"),
                "user_id": taken.column("user_id"),
                "item_idx": encoded.item_idx.astype(_ITEM_DTYPE),
                "behaviour_idx": encoded.behaviour_idx.astype(_BEHAVIOUR_DTYPE),
                "timestamp": taken.column("timestamp"),
                "event_id": taken.column("event_id"),
                "event_hash": pa.array(chosen.event_hash[chosen.rows],
                                       mask=~chosen.has_id[chosen.rows]),
                "produced_ms": taken.column("produced_ms"),
            })))
        if commit_rows:
            k = len(commit_rows)
            inserts.append(("commits", _COMMIT_COLUMNS, pa.table({
                "batch_seq": pa.array([batch_seq] * k, pa.int64()),
                "applied_at": pa.array([now] * k, pa.float64()),
                "topic": pa.array([r[0] for r in commit_rows], pa.string()),
                "partition": pa.array([r[1] for r in commit_rows], pa.int32()),
                "next_offset": pa.array([r[2] for r in commit_rows], pa.int64()),
                "n_applied": pa.array([r[3] for r in commit_rows], pa.int64()),
                "n_duplicates": pa.array([r[4] for r in commit_rows], pa.int64()),
            })))
        self.db.append(inserts)

    def _advance_mirror(self, taken: pa.Table, parts: _Partitions, chosen: _Selection,
                        encoded: _Encoded, new_offsets: dict[tuple[str, int], int],
                        seq: np.ndarray, batch_seq: int, now: float) -> None:
        """The batch is committed: bring the mirror along (rebuilt from the file if this fails
        half-way)."""
        try:
            with self._mirror:
                self._advance(taken, parts, chosen, encoded, new_offsets, seq, batch_seq, now)
        except BaseException:
            log.exception("mirror update failed after a committed apply; reloading %s",
                          self.db.path)
            self._load()
            raise

    def _advance(self, taken: pa.Table, parts: _Partitions, chosen: _Selection,
                 encoded: _Encoded, new_offsets: dict[tuple[str, int], int],
                 seq: np.ndarray, batch_seq: int, now: float) -> None:
        """`_advance_mirror`'s changes, under the mirror lock."""
        acc = chosen.rows
        self._behaviours.commit(encoded.new_behaviours)
        self._items.commit(encoded.new_items)
        self._grow_popularity()
        np.add.at(self._popularity, (encoded.item_idx, encoded.behaviour_idx), 1)
        topic_lut = np.array([self._users.topic_code(t) for t in parts.topic_names],
                             dtype=np.int32)
        self._users.append(
            encoded.users,
            encoded.item_idx,
            encoded.behaviour_idx,
            seq,
            topic_lut[parts.topic_idx[acc]] if acc.size else np.zeros(0, np.int32),
            parts.partition[acc],
            parts.offset[acc],
            taken.column("timestamp").to_numpy(),
            taken.column("produced_ms").fill_null(MISSING).to_numpy(),
        )
        self._dedup.add(chosen.event_hash[acc][chosen.has_id[acc]], now)
        c = self._counters
        c.offsets.update(new_offsets)
        c.last_seq += int(acc.size)
        c.batch_seq = batch_seq

    def _result(self, table: pa.Table, chosen: _Selection, encoded: _Encoded | None,
                new_offsets: dict[tuple[str, int], int], batch_seq: int | None,
                before: _Before | None) -> ApplyResult:
        details: dict[str, Any] = {}
        if before is not None:
            n = table.num_rows
            item_idx = np.zeros(n, dtype=np.int64)
            behaviour_idx = np.zeros(n, dtype=np.int64)
            if encoded is not None:
                item_idx[chosen.rows] = encoded.item_idx
                behaviour_idx[chosen.rows] = encoded.behaviour_idx
            details = {
                "user_ids": before.user_ids, "user_codes": before.user_codes,
                "before_items": before.items, "before_behaviours": before.behaviours,
                "item_idx": item_idx, "behaviour_idx": behaviour_idx,
            }
        return ApplyResult(
            applied=int(chosen.rows.size),
            duplicate_offsets=chosen.duplicate_offsets,
            duplicate_event_ids=chosen.duplicate_event_ids,
            touched_users=list(encoded.users[1]) if encoded is not None else [],
            new_items=len(encoded.new_items) if encoded is not None else 0,
            new_behaviours=list(encoded.new_behaviours) if encoded is not None else [],
            offsets=new_offsets,
            batch_seq=batch_seq,
            rows=chosen.rows,
            **details,
        )

    def _grow_popularity(self) -> None:
        rows, cols = len(self._items) + 1, len(self._behaviours) + 1
        old_rows, old_cols = self._popularity.shape
        if rows <= old_rows and cols <= old_cols:
            return
        grown = np.zeros((max(rows, 2 * old_rows), max(cols, old_cols)), dtype=np.int64)
        grown[:old_rows, :old_cols] = self._popularity
        self._popularity = grown

    def reset_offset(self, topic: str, partition: int, to_offset: int, reason: str) -> int | None:
        """Move the stored next offset of (`topic`, `partition`) to `to_offset`, also backwards (the
        partition's log was replaced, e.g. a topic recreated: its offsets start again), and record
        the reset with `reason` in ``offset_resets``. Events already applied stay; new ones at any
        offset from `to_offset` on are applied (event ids still drop repeats). Returns the offset it
        replaced (None: there was none)."""
        with self.db.lock:
            self.db.writable()
            c = self._counters
            before = c.offsets.get((topic, partition))
            batch_seq = c.batch_seq + 1
            self.db.transaction(lambda con: con.execute(
                "INSERT INTO offset_resets VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [batch_seq, float(self._clock()), topic, partition,
                 -1 if before is None else before, int(to_offset), reason],
            ))
            with self._mirror:
                c.offsets[(topic, partition)] = int(to_offset)
                c.batch_seq = batch_seq
            log.warning("stored offset of %s[%d] reset from %s to %d: %s", topic, partition,
                        before, to_offset, reason)
            return before

    def release(self, partitions: Sequence[tuple[str, int]], extra_tables: Sequence[str] = ()) -> int:
        """Forget every row of the (topic, partition) pairs `partitions`: their events, users,
        popularity, offsets, offset resets and remembered ids (plus the same pairs' rows of
        `extra_tables`, tables with ``topic`` and ``"partition"`` columns), in one transaction;
        then rebuild the mirror from the file. The item vocabulary stays (indices never change).
        Scale-out: a partition that moved to another instance. Users must be keyed to one
        partition (a user's sequence is its partition's). Returns the events removed."""
        pairs = [(str(t), int(p)) for t, p in partitions]
        if not pairs:
            return 0
        with self.db.lock:
            self.db.writable()
            batch_seq = self._counters.batch_seq

            def write(con: duckdb.DuckDBPyConnection) -> int:
                removed = 0
                for topic, partition in pairs:
                    removed += int(con.execute(
                        'SELECT count(*) FROM events WHERE topic = $1 AND "partition" = $2', [topic, partition]
                    ).fetchall()[0][0])
                    for table in ("events", "users", "popularity", "commits", "event_ids", "offset_resets",
                                  *extra_tables):
                        con.execute(f'DELETE FROM {table} WHERE topic = $1 AND "partition" = $2', [topic, partition])
                # Batch numbers never go back (a later commit must stay the newest of its pair).
                con.execute("UPDATE counters SET batch_seq = greatest(batch_seq, $1)", [batch_seq])
                return removed

            removed = self.db.transaction(write)
            self._load()
            log.info("released %s: %d events removed", [f"{t}[{p}]" for t, p in pairs], removed)
            return removed

    # -- folding the snapshots and the id window -----------------------------------------------

    def fold(self) -> int:
        """Bring the snapshot tables (users, popularity) up to the last applied event.

        Runs by itself every `fold_events` events and on `StateStore.close`; retention folds
        first. Returns how many users were written.
        """
        with self.db.lock:
            self.db.writable()
            return self._fold()

    def _fold(self) -> int:
        c = self._counters
        rows = self._users.dirty_rows()
        upto = c.last_seq
        if upto == c.folded_seq and rows.size == 0:
            return 0
        snapshot = self._snapshot_table(rows)
        now = self._clock()

        def write(con: duckdb.DuckDBPyConnection) -> int:
            if rows.size:
                con.register("_fold_users", snapshot)
                try:
                    con.execute(
                        "DELETE FROM users WHERE user_id IN (SELECT user_id FROM _fold_users)"
                    )
                    con.execute(
                        f"INSERT INTO users ({_USER_COLUMNS}) SELECT {_USER_COLUMNS} "
                        "FROM _fold_users"
                    )
                finally:
                    con.unregister("_fold_users")
            added = 0
            if upto > c.folded_seq:
                added = con.execute(
                    'INSERT INTO popularity SELECT topic, "partition", item_idx, behaviour_idx, '
                    "count(*) FROM events WHERE seq > $1 AND seq <= $2 GROUP BY ALL",
                    [c.folded_seq, upto],
                ).fetchall()[0][0]
            con.execute(
                "UPDATE counters SET folded_seq = $1, batch_seq = $2, folded_at = $3",
                [upto, c.batch_seq, now],
            )
            return int(added)

        added = self.db.transaction(write)
        with self._mirror:
            self._users.clear_dirty()
            c.folded_seq = upto
            c.popularity_rows += added
            self._dedup.expire(self.id_window_start())
        if c.popularity_rows > 2 * max(c.popularity_rows_aggregated, 1):
            self.aggregate_popularity()
        log.debug("folded %d users up to event %d of %s", rows.size, upto, self.db.path)
        return int(rows.size)

    def aggregate_popularity(self) -> None:
        """Rewrite the popularity snapshot as one row per (topic, partition, item, behaviour)."""
        def write(con: duckdb.DuckDBPyConnection) -> int:
            con.execute(
                'CREATE TEMP TABLE _popularity AS SELECT topic, "partition", item_idx, '
                "behaviour_idx, sum(count)::BIGINT AS count FROM popularity GROUP BY ALL"
            )
            con.execute("DELETE FROM popularity")
            n = con.execute(
                'INSERT INTO popularity SELECT * FROM _popularity ORDER BY topic, "partition", '
                "item_idx, behaviour_idx"
            ).fetchall()[0][0]
            con.execute("DROP TABLE _popularity")
            return int(n)

        with self.db.lock:
            rows = self.db.transaction(write)
            self._counters.popularity_rows = self._counters.popularity_rows_aggregated = rows

    def id_window_start(self) -> float:
        """Unix s (wall clock): ids applied before it are forgotten."""
        return self._clock() - self.event_id_window_s

    def forget_ids(self, cutoff: float) -> None:
        """Forget event ids applied before `cutoff` (unix s), in the file and in memory."""
        with self.db.lock:
            self.db.transaction(
                lambda con: con.execute("DELETE FROM event_ids WHERE applied_at < $1", [cutoff])
            )
            with self._mirror:
                self._dedup.expire(cutoff)

    def _snapshot_table(self, rows: np.ndarray) -> pa.Table:
        users = self._users
        list_offsets, items, behaviours = users.row_lists(rows)
        topics = np.array(users.topics, dtype=object)
        produced = users.last_produced_ms[rows]
        return pa.table({
            "user_id": pa.array([users.user_ids[r] for r in rows.tolist()], pa.string()),
            "topic": pa.array(topics[users.last_topic[rows]] if rows.size else [], pa.string()),
            "partition": pa.array(users.last_partition[rows], pa.int32()),
            "items": pa.ListArray.from_arrays(pa.array(list_offsets), pa.array(items, pa.int32())),
            "behaviours": pa.ListArray.from_arrays(
                pa.array(list_offsets), pa.array(behaviours, pa.int16())
            ),
            "n_events": pa.array(users.n_events[rows], pa.int64()),
            "first_seq": pa.array(users.first_seq[rows], pa.int64()),
            "last_seq": pa.array(users.last_seq[rows], pa.int64()),
            "last_timestamp": pa.array(users.last_timestamp[rows], pa.float64()),
            "last_offset": pa.array(users.last_offset[rows], pa.int64()),
            "last_produced_ms": pa.array(produced, pa.int64(), mask=produced == MISSING),
        })

    # -- reads ---------------------------------------------------------------------------------

    def sequences(self, user_ids: Sequence[str], *, width: int | None = None) -> Sequences:
        """Padded sequences of `user_ids` for the model, plus each user's newest event.

        Args:
            user_ids: users, [n]; unknown users get length 0 and all-zero rows.
            width: columns (default: `sequence_length`); smaller keeps the newest events.

        Returns:
            `Sequences` with items / behaviours int64 [n, width] (left-padded with 0, newest
            last), lengths [n], and last_partition / last_offset / last_timestamp /
            last_produced_ms [n].
        """
        with self._mirror:
            self.db.con  # noqa: B018 - raises when closed
            return self._users.gather(user_ids, width=width)

    def activity(self) -> UserActivity:
        """Every held user's sequence length and recency (for sampling policies)."""
        with self._mirror:
            self.db.con  # noqa: B018 - raises when closed
            held = len(self._users)
            return UserActivity(
                list(self._users.user_ids),
                self._users.lengths[:held].astype(np.int64),
                self._users.last_seq[:held].copy(),
            )

    def offsets(self, topic: str) -> dict[int, int]:
        """Stored next offset to read per partition of `topic` (seek there on assignment)."""
        with self._mirror:
            self.db.con  # noqa: B018 - raises when closed
            return {p: o for (t, p), o in sorted(self._counters.offsets.items()) if t == topic}

    def all_offsets(self) -> dict[tuple[str, int], int]:
        """Stored next offset to read per (topic, partition)."""
        with self._mirror:
            return dict(sorted(self._counters.offsets.items()))

    def partitions(self) -> list[tuple[str, int]]:
        """(topic, partition) pairs the store holds offsets for."""
        with self._mirror:
            return sorted(self._counters.offsets)

    def offset_resets(self) -> list[dict[str, Any]]:
        """Every recorded offset reset, oldest first."""
        with self.db.lock:
            rows = self.db.con.execute(
                'SELECT reset_at, topic, "partition", from_offset, to_offset, reason '
                "FROM offset_resets ORDER BY batch_seq"
            ).fetchall()
        keys = ("reset_at", "topic", "partition", "from_offset", "to_offset", "reason")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def known_event_ids(self, event_ids: Sequence[str]) -> np.ndarray:
        """Bool [n]: which of `event_ids` (non-null) the id memory holds (applied within the
        window)."""
        with self.db.lock:
            return self._dedup.contains(hash_ids(list(event_ids)))

    def applied_events_by_id(
        self, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, str, str, float]]:
        """(user_id, item_id, behavior, timestamp) of the applied event of each id in `event_ids`
        that the events table still holds (trimmed ones are absent). For the rare ids seen twice,
        not a hot path (one scan of the events table)."""
        if not event_ids:
            return {}
        wanted = pa.table({"h": hash_ids(list(event_ids)),
                           "event_id": pa.array(list(event_ids), pa.string())})
        with self.db.lock:
            con = self.db.con
            con.register("_wanted_ids", wanted)
            try:
                rows = con.execute(
                    "SELECT e.event_id, e.user_id, i.item_id, b.name, e.timestamp FROM events e "
                    "JOIN _wanted_ids w ON e.event_hash = w.h AND e.event_id = w.event_id "
                    "JOIN items i ON i.idx = e.item_idx JOIN behaviours b ON b.idx = e.behaviour_idx"
                ).fetchall()
            finally:
                con.unregister("_wanted_ids")
        return {r[0]: (r[1], r[2], r[3], float(r[4])) for r in rows}

    def item_ids(self) -> list[str]:
        """External item ids: position i holds the id of item index i + 1."""
        with self._mirror:
            return list(self._items.names)

    def behaviour_names(self) -> list[str]:
        """Behaviour names: position i holds the name of behaviour index i + 1."""
        with self._mirror:
            return list(self._behaviours.names)

    def num_items(self) -> int:
        """Items in the vocabulary (the highest item index)."""
        return len(self._items)

    def user_ids(self) -> list[str]:
        """Every user with at least one applied event, in order of first appearance. (The
        `users` table is a snapshot as of the last fold and may lack the newest users.)"""
        with self._mirror:
            self.db.con  # noqa: B018 - raises when closed
            return list(self._users.user_ids)

    def num_users(self) -> int:
        """Users with at least one applied event."""
        return len(self._users)

    def item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        """1-based indices of `item_ids`, int64 [n]; 0 for ids not in the vocabulary."""
        with self._mirror:
            get = self._items.index.get
            return np.fromiter((get(i, 0) for i in item_ids), dtype=np.int64,
                               count=len(item_ids))

    def item_popularity(self, behaviours: Sequence[str] | None = None) -> np.ndarray:
        """Applied events per item, int64 [num_items + 1] (index 0 is 0).

        Args:
            behaviours: count only events of these behaviours (default: all).

        Raises:
            ValueError: a behaviour name is not in the vocabulary.
        """
        with self._mirror:
            pop = self._popularity[: len(self._items) + 1]
            if behaviours is None:
                return pop.sum(axis=1)
            cols = []
            for name in behaviours:
                idx = self._behaviours.get(name)
                if idx is None:
                    raise ValueError(
                        f"unknown behaviour {name!r} (known: {self._behaviours.names})"
                    )
                cols.append(idx)
            if idx_out_of_range := [i for i in cols if i >= pop.shape[1]]:
                raise ValueError(f"behaviour indices {idx_out_of_range} have no counts")
            return pop[:, cols].sum(axis=1)

    def stats(self) -> dict[str, int]:
        """Sizes: users, items, behaviours, events held, events not folded, remembered ids,
        partitions, applied batches."""
        with self.db.lock:
            c = self._counters
            held = self.db.con.execute("SELECT count(*) FROM events").fetchall()[0][0]
            return {
                "users": len(self._users),
                "items": len(self._items),
                "behaviours": len(self._behaviours),
                "events_held": int(held),
                "events_applied": c.last_seq,
                "events_not_folded": c.last_seq - c.folded_seq,
                "event_ids_remembered": len(self._dedup),
                "partitions": len(c.offsets),
                "batches": c.batch_seq,
            }


def _first_positions(item_idx: np.ndarray, base: int) -> np.ndarray:
    """Positions in the batch of the first event of each new item (indices > base), in index
    order."""
    new = np.flatnonzero(item_idx > base)
    _, first = np.unique(item_idx[new], return_index=True)
    return new[first]
