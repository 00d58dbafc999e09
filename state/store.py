"""`StateStore`: the service's durable state in one DuckDB file, applied exactly once.

Exactly-once across crashes
---------------------------
Kafka delivers at least once: after a crash the consumer seeks to the offsets the store holds and
messages are delivered again. `apply(events, offsets)` therefore writes, in **one DuckDB
transaction**, the accepted events, the vocabulary growth and the next offset to read of every
(topic, partition) of the batch. After a crash the file holds either all of a batch or none of it,
and its offsets say exactly where the applied events end. Two rules drop what was applied before:

* **By offset** (redelivery): an event whose `offset` is below the stored next offset of its
  (topic, partition) was applied already and is dropped, with or without an `event_id`. This is
  what makes replaying from the stored offsets (or from older Kafka-committed offsets) harmless.
* **By event id** (producer retries, which Kafka stores again at a *new* offset): an event whose
  `event_id` was applied within the last `event_id_window_s` seconds (wall clock) is dropped, as
  is a repeat of an id earlier in the same batch (the first one wins). **Events without an
  `event_id` are deduplicated by offset only**: a retry of such an event that the producer wrote
  twice is applied twice. The id memory is kept in the file (`events.event_hash`, and the
  `event_ids` table for ids whose events were trimmed), so trimming events never shortens it;
  only the window does.

Stored offsets never move backwards; `offsets` may run past the last event of the batch (records
that went to the dead letter topic advance it too) and is recorded even for an empty batch.

Where the state lives
---------------------
The file is the truth; this process holds a mirror of what it reads often, rebuilt from the file
on every open: the vocabularies (dicts), the offsets, the id memory (16 bytes per id), item
popularity and every user's rolling sequence as dense numpy rows (6 bytes x N per user, e.g.
300 MB for a million users at N = 50). DuckDB is fast on set-based appends and slow on per-row
updates (an `INSERT ... ON CONFLICT DO UPDATE` of list columns costs about 20 us per row here,
growing with the table), so `apply` only *appends* (events, commit rows, new vocabulary), and the
per-user sequences and popularity are persisted as snapshot tables that are brought up to date
("folded") every `fold_events` applied events, in their own transaction: the state is the
snapshot plus the events applied after it (`counters.folded_seq`), and opening the file replays
those. Retention never trims events that are not folded yet.

One writer per file: DuckDB locks the file; a second writer (another process, or a second store
in this process) gets `StoreLockedError` naming the file. The store is safe to share between
threads (calls are serialised) but is meant for one.

Partitions: every event, commit row, snapshot row (a user belongs to the partition of the newest
event), popularity count, remembered id and published recommendation records its
(topic, partition); `export_partition` / `import_partition` / `drop_partition` move one
partition's state between stores (e.g. through a changelog topic, later).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from state import partitions as partition_io
from state.config import StoreConfig
from state.dedup import EventIdIndex, hash_ids
from state.errors import (
    ConfigMismatchError,
    InvalidEventError,
    ReadOnlyStoreError,
    StoreClosedError,
    StoreError,
    StoreLockedError,
)
from state.registry import RegistryMixin
from state.retention import RetentionMixin
from state.schema import migrate
from state.sequences import MISSING, RollingSequences, Sequences
from state.validate import (
    CheckResult,
    EventRules,
    behaviour_names_ok,
    check_events,
    normalize_events,
    normalize_offsets,
)
from state.vocab import StagedVocabulary, encode

log = logging.getLogger(__name__)

_DEFAULTS = StoreConfig()
# Same defaults as stream.config.EventLimits (state may not import stream).
DEFAULT_MAX_ID_LENGTH = 128
DEFAULT_MIN_TIMESTAMP = 0.0
DEFAULT_MAX_FUTURE_SKEW_S = 86_400.0
MEMORY = ":memory:"

_EVENT_COLUMNS = (
    'seq, batch_seq, applied_at, topic, "partition", "offset", user_id, item_idx, behaviour_idx, '
    "timestamp, event_id, event_hash, produced_ms"
)
_USER_COLUMNS = (
    'user_id, topic, "partition", items, behaviours, n_events, first_seq, last_seq, '
    "last_timestamp, last_offset, last_produced_ms"
)
_COMMIT_COLUMNS = 'batch_seq, applied_at, topic, "partition", next_offset, n_applied, n_duplicates'
_MAX_APPENDS = 4
_LOCK_PID = re.compile(r"\(PID (\d+)\)")

_open_writers: set[str] = set()
_open_writers_lock = threading.Lock()


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
    """

    applied: int
    duplicate_offsets: int
    duplicate_event_ids: int
    touched_users: list[str]
    new_items: int
    new_behaviours: list[str]
    offsets: dict[tuple[str, int], int]
    batch_seq: int | None

    @property
    def duplicates(self) -> int:
        """Events dropped as already applied (by offset or by event id)."""
        return self.duplicate_offsets + self.duplicate_event_ids


@dataclass
class _Counters:
    last_seq: int = 0
    batch_seq: int = 0
    folded_seq: int = 0
    popularity_rows: int = 0
    popularity_rows_aggregated: int = 0
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)


class StateStore(RegistryMixin, RetentionMixin):
    """The DuckDB store of events, rolling user sequences, vocabularies, offsets and registry.

    Args:
        path: DuckDB file, or ":memory:" (private to this store, for tests).
        behaviours: configured behaviour vocabulary, in index order (index 1 first). The file's
            vocabulary must start with it, or it must start with the file's (the rest is added).
        sequence_length: N, events kept per user (the newest N).
        open_vocabulary: accept unknown behaviours (appended to the vocabulary) instead of refusing.
        max_id_length: longest user_id / item_id / event_id / behaviour name (characters).
        min_timestamp: earliest accepted event time (unix s).
        max_future_skew_s: latest accepted event time is the wall clock plus this (s).
        read_only: open without writing (fails while another process writes the file).
        threads: DuckDB threads (0: DuckDB's default).
        memory_limit: DuckDB memory_limit, e.g. "2GB".
        checkpoint_threshold: DuckDB checkpoint_threshold, e.g. "16MB".
        fsync_mode: DuckDB fsync_mode: "STANDARD" (sync the WAL at each commit), "NONE" (leave
            it to the OS: still exactly-once across process crashes, not across OS crashes) or
            "FULL".
        event_id_window_s: seconds an applied event_id is remembered (wall clock).
        fold_events: applied events between two folds of the snapshot tables.
        recent_fraction: default share of a training sample taken from recently touched users.
        recent_users: default pool of recent users the recent share is drawn from.
        retention_s: `retain()` trims events older than this (event time, s); None keeps all.
        retention_rows: `retain()` keeps at most this many newest events; None keeps all.
        clock: wall clock (unix s); injectable for tests.

    Raises:
        StoreLockedError: another writer holds the file.
        SchemaVersionError: the file is newer than this code (or read-only and older).
        ConfigMismatchError: `behaviours` contradicts the file's vocabulary.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        behaviours: Sequence[str],
        sequence_length: int,
        open_vocabulary: bool = False,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        min_timestamp: float = DEFAULT_MIN_TIMESTAMP,
        max_future_skew_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
        read_only: bool = False,
        threads: int = _DEFAULTS.threads,
        memory_limit: str | None = _DEFAULTS.memory_limit,
        checkpoint_threshold: str | None = _DEFAULTS.checkpoint_threshold,
        fsync_mode: str = _DEFAULTS.fsync_mode,
        event_id_window_s: float = _DEFAULTS.event_id_window_s,
        fold_events: int = _DEFAULTS.fold_events,
        recent_fraction: float = _DEFAULTS.recent_fraction,
        recent_users: int | None = _DEFAULTS.recent_users,
        retention_s: float | None = None,
        retention_rows: int | None = _DEFAULTS.retention_rows,
        clock: Callable[[], float] = time.time,
    ):
        behaviour_names_ok(list(behaviours), max_id_length)
        if sequence_length < 1:
            raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
        if fold_events < 1 or event_id_window_s <= 0 or max_id_length < 1:
            raise ValueError("fold_events, event_id_window_s and max_id_length must be positive")
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction}")
        self._lock = threading.RLock()
        self._memory = str(path) == MEMORY
        self.path: str = MEMORY if self._memory else str(Path(path).expanduser().resolve())
        self.read_only = read_only
        self.sequence_length = int(sequence_length)
        self.open_vocabulary = open_vocabulary
        self._configured_behaviours = list(behaviours)
        self._max_id_length = max_id_length
        self._min_timestamp = min_timestamp
        self._max_future_skew_s = max_future_skew_s
        self._duck_config = {
            key: value
            for key, value in (
                ("threads", threads or None),
                ("memory_limit", memory_limit),
                ("checkpoint_threshold", checkpoint_threshold),
                ("fsync_mode", fsync_mode),
            )
            if value is not None
        }
        self.event_id_window_s = float(event_id_window_s)
        self.fold_events = int(fold_events)
        self.recent_fraction = float(recent_fraction)
        self.recent_users = recent_users
        self.retention_s = retention_s
        self.retention_rows = retention_rows
        self._clock = clock
        self._con: duckdb.DuckDBPyConnection | None = None
        self._registered_writer = False
        self._connect()
        try:
            migrate(self._con, path=self.path, read_only=read_only)
            self._load()
        except BaseException:
            self._disconnect()
            raise

    @classmethod
    def from_config(
        cls,
        cfg: StoreConfig,
        *,
        behaviours: Sequence[str],
        open_vocabulary: bool = False,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        min_timestamp: float = DEFAULT_MIN_TIMESTAMP,
        max_future_skew_s: float = DEFAULT_MAX_FUTURE_SKEW_S,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> StateStore:
        """A store configured from the `store` settings section (plus the event limits)."""
        return cls(
            cfg.path,
            behaviours=behaviours,
            sequence_length=cfg.sequence_length,
            open_vocabulary=open_vocabulary,
            max_id_length=max_id_length,
            min_timestamp=min_timestamp,
            max_future_skew_s=max_future_skew_s,
            read_only=read_only,
            threads=cfg.threads,
            memory_limit=cfg.memory_limit,
            checkpoint_threshold=cfg.checkpoint_threshold,
            fsync_mode=cfg.fsync_mode,
            event_id_window_s=cfg.event_id_window_s,
            fold_events=cfg.fold_events,
            recent_fraction=cfg.recent_fraction,
            recent_users=cfg.recent_users,
            retention_s=None if cfg.retention_days is None else cfg.retention_days * 86_400.0,
            retention_rows=cfg.retention_rows,
            clock=clock,
        )

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        if not self._memory and not self.read_only:
            with _open_writers_lock:
                if self.path in _open_writers:
                    raise StoreLockedError(self.path, "already open for writing in this process")
                _open_writers.add(self.path)
                self._registered_writer = True
        try:
            if not self._memory:
                if self.read_only and not os.path.exists(self.path):
                    raise StoreError(f"state file {self.path} does not exist")
                if not self.read_only:
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._con = duckdb.connect(
                self.path, read_only=self.read_only, config=dict(self._duck_config)
            )
        except duckdb.IOException as exc:
            self._release_writer()
            if "lock" in str(exc).lower():
                match = _LOCK_PID.search(str(exc))
                detail = f"held by PID {match.group(1)}" if match else "the file is locked"
                raise StoreLockedError(self.path, detail) from None
            raise StoreError(f"cannot open state file {self.path}: {exc}") from exc
        except duckdb.ConnectionException as exc:
            self._release_writer()
            raise StoreLockedError(
                self.path, f"already open in this process with other settings: {exc}"
            ) from None
        except BaseException:
            self._release_writer()
            raise

    def _release_writer(self) -> None:
        if self._registered_writer:
            with _open_writers_lock:
                _open_writers.discard(self.path)
            self._registered_writer = False

    def _disconnect(self) -> None:
        if self._con is not None:
            try:
                self._con.close()
            finally:
                self._con = None
        self._release_writer()

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection (for read-only inspection; do not write through it)."""
        if self._con is None:
            raise StoreClosedError(f"state store {self.path} is closed")
        return self._con

    def close(self) -> None:
        """Fold pending state (when writable) and close the file. Idempotent."""
        with self._lock:
            if self._con is None:
                return
            try:
                if not self.read_only:
                    self._fold()
            finally:
                self._disconnect()

    def __del__(self) -> None:
        # A store dropped without close(): free the file (no fold; the next open replays).
        if getattr(self, "_con", None) is not None or getattr(self, "_registered_writer", False):
            try:
                self._disconnect()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._con is None

    def _writable(self) -> duckdb.DuckDBPyConnection:
        con = self.con
        if self.read_only:
            raise ReadOnlyStoreError(f"state store {self.path} is open read-only")
        return con

    def _transaction(self, body: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run `body(con)` in one transaction; roll back and re-raise on any error."""
        con = self._writable()
        con.execute("BEGIN TRANSACTION")
        try:
            result = body(con)
            con.execute("COMMIT")
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                log.exception("rollback failed on %s", self.path)
            if isinstance(exc, (StoreError, KeyboardInterrupt)) or not isinstance(
                exc, duckdb.Error
            ):
                raise
            raise StoreError(f"write to state file {self.path} failed: {exc}") from exc
        return result

    def _append(self, inserts: Sequence[tuple[str, str, pa.Table]]) -> None:
        """Append Arrow tables to tables, all in one transaction sent as one DuckDB call.

        `inserts`: (table, column list, data) each, at most four. The data are read through
        DuckDB's replacement scan of this frame's locals `_t0` .. `_t3`, which saves a
        register / unregister round trip per table (about 1 ms each on the benchmark machine,
        where a whole apply of 1,000 events takes 10-20 ms).
        """
        if len(inserts) > _MAX_APPENDS:
            raise ValueError(f"at most {_MAX_APPENDS} tables per append")
        con = self._writable()
        _t0, _t1, _t2, _t3 = [data for _, _, data in inserts] + [None] * (
            _MAX_APPENDS - len(inserts))
        statements = [
            f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _t{k}"
            for k, (table, columns, _) in enumerate(inserts)
        ]
        try:
            con.execute(";\n".join(["BEGIN TRANSACTION", *statements, "COMMIT"]))
        except BaseException as exc:
            try:
                con.execute("ROLLBACK")
            except duckdb.Error:
                pass  # the failed statement ended the transaction already
            if isinstance(exc, duckdb.Error):
                raise StoreError(f"write to state file {self.path} failed: {exc}") from exc
            raise
        del _t0, _t1, _t2, _t3

    # -- loading the mirror --------------------------------------------------------------------

    def _load(self) -> None:
        """(Re)build the in-memory mirror from the file."""
        con = self.con
        self._load_behaviours(con)
        items = con.sql("SELECT item_id FROM items ORDER BY idx").to_arrow_table()
        self._items = StagedVocabulary(items.column(0).to_pylist())
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
            'SELECT topic, "partition", max(batch_seq), arg_max(to_offset, batch_seq) FROM offset_resets GROUP BY ALL'
        ).fetchall()
        for t, p, reset_seq, to_offset in resets:
            later = con.execute(
                'SELECT max(next_offset) FROM commits WHERE topic = $1 AND "partition" = $2 AND batch_seq > $3',
                [t, p, reset_seq],
            ).fetchall()[0][0]
            c.offsets[(t, int(p))] = max(int(to_offset), int(later) if later is not None else 0)
            c.batch_seq = max(c.batch_seq, int(reset_seq))
        c.popularity_rows = int(con.execute("SELECT count(*) FROM popularity").fetchall()[0][0])
        c.popularity_rows_aggregated = c.popularity_rows
        self._counters = c

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
        cutoff = self._clock() - self.event_id_window_s
        ids = con.execute(
            "SELECT event_hash, applied_at FROM events "
            "WHERE event_hash IS NOT NULL AND applied_at >= $1 "
            "UNION ALL SELECT event_hash, applied_at FROM event_ids WHERE applied_at >= $1",
            [cutoff],
        ).fetchnumpy()
        self._dedup.add(ids["event_hash"], ids["applied_at"])
        log.info(
            "state file %s: %d users, %d items, %d behaviours, %d partitions, %d events after "
            "the snapshot replayed, %d event ids remembered",
            self.path, len(self._users), len(self._items), len(self._behaviours),
            len(c.offsets), c.last_seq - c.folded_seq, len(self._dedup),
        )

    def _load_behaviours(self, con: duckdb.DuckDBPyConnection) -> None:
        stored = [r[0] for r in con.execute("SELECT name FROM behaviours ORDER BY idx").fetchall()]
        configured = self._configured_behaviours
        if stored[: len(configured)] == configured:
            names = stored
        elif configured[: len(stored)] == stored:
            names = configured
            if not self.read_only:
                extra = configured[len(stored):]
                self._transaction(lambda c: c.executemany(
                    "INSERT INTO behaviours VALUES (?, ?)",
                    [[len(stored) + k + 1, name] for k, name in enumerate(extra)],
                ))
        else:
            raise ConfigMismatchError(
                f"state file {self.path} numbers behaviours as {stored}, the configured "
                f"vocabulary is {configured}; indices would change. Configure the file's order "
                "(new names may only be appended) or use another file"
            )
        self._behaviours = StagedVocabulary(names)

    def _load_snapshot(self, con: duckdb.DuckDBPyConnection) -> None:
        snap = con.sql(f"SELECT {_USER_COLUMNS} FROM users ORDER BY first_seq, user_id").to_arrow_table()
        if snap.num_rows == 0:
            return
        items = snap.column("items").combine_chunks()
        behaviours = snap.column("behaviours").combine_chunks()
        offsets = items.offsets.to_numpy().astype(np.int64)
        topic_codes = self._topic_codes(snap.column("topic"))
        produced = snap.column("last_produced_ms").fill_null(MISSING).to_numpy()
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
                "last_produced_ms": produced,
            },
            topic_codes,
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

    @property
    def rules(self) -> EventRules:
        """What `apply` accepts."""
        return EventRules(
            behaviours=frozenset(self._behaviours.names),
            open_vocabulary=self.open_vocabulary,
            max_id_length=self._max_id_length,
            min_timestamp=self._min_timestamp,
            max_future_skew_s=self._max_future_skew_s,
        )

    def check_events(self, events: pa.Table) -> CheckResult:
        """Which rows `apply` would accept and why the others are refused (no write), so a caller
        can route bad rows to a dead letter topic first.

        Raises:
            InvalidEventError: a column is missing or of a type that cannot be read.
        """
        with self._lock:
            self.con  # noqa: B018 - raises when closed
            return check_events(normalize_events(events), self.rules, now=self._clock())

    def apply(
        self, events: pa.Table, offsets: Mapping[tuple[str, int], int] | None = None
    ) -> ApplyResult:
        """Apply a batch of events and record the consumed offsets, in one transaction.

        Args:
            events: columns user_id, item_id, behavior (str), timestamp (float64, unix s), topic
                (str), partition (int32), offset (int64), optional event_id (str, nullable) and
                produced_ms (int64, nullable). Row order is arrival order.
            offsets: next offset to read per (topic, partition) after this batch; may run past
                the batch's last event; partitions of the batch that are absent get their last
                event's offset + 1. Recorded even when `events` is empty.

        Returns:
            What was applied and dropped (see `ApplyResult`).

        Raises:
            InvalidEventError: a row is invalid, or `offsets` is below an event of the batch;
                nothing is written.
            StoreError: the write failed; nothing is written.
        """
        with self._lock:
            self._writable()
            result = self._apply(events, offsets or {})
            if self._counters.last_seq - self._counters.folded_seq >= self.fold_events:
                self._fold()
            return result

    def _apply(self, events: pa.Table, offsets: Mapping[tuple[str, int], int]) -> ApplyResult:
        table = normalize_events(events)
        now = float(self._clock())
        check_events(table, self.rules, now=now).raise_if_invalid()
        wanted = normalize_offsets(offsets)
        c = self._counters
        n = table.num_rows

        # Per (topic, partition) of the batch: stored next offset, highest offset in the batch.
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
        stored = np.array([c.offsets.get(pair, 0) for pair in pairs], dtype=np.int64)
        fresh = offset >= stored[inverse] if n else np.zeros(0, dtype=bool)

        # Event ids: drop repeats within the batch and ids remembered from earlier batches.
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
        acc = np.flatnonzero(accepted)
        m = acc.size

        applied_per_pair = np.bincount(inverse[acc], minlength=len(pairs))
        seen_per_pair = np.bincount(inverse, minlength=len(pairs))
        new_offsets: dict[tuple[str, int], int] = {}
        commit_rows: list[tuple[str, int, int, int, int]] = []
        for pair in dict.fromkeys([*pairs, *wanted]):
            current = c.offsets.get(pair)
            p = pairs.index(pair) if pair in pairs else -1
            target = max(
                current if current is not None else 0,
                wanted.get(pair, 0),
                int(batch_max[p]) + 1 if p >= 0 else 0,
            )
            new_offsets[pair] = target
            applied_p = int(applied_per_pair[p]) if p >= 0 else 0
            if target != current or applied_p:
                dup_p = int(seen_per_pair[p]) - applied_p if p >= 0 else 0
                commit_rows.append((pair[0], pair[1], target, applied_p, dup_p))

        result_dups = int(n - fresh.sum()), int(fresh.sum() - m)
        if not commit_rows and m == 0:
            return ApplyResult(0, *result_dups, [], 0, [], new_offsets, None)

        taken = table if m == n else table.take(pa.array(acc))
        users = encode(taken.column("user_id"))
        behaviour_idx, new_behaviours = self._behaviours.lookup_array(taken.column("behavior"))
        item_idx, new_items = self._items.lookup_array(taken.column("item_id"))
        for vocab, new, kind, dtype in ((self._behaviours, new_behaviours, "behaviour", np.int16),
                                        (self._items, new_items, "item", np.int32)):
            if len(vocab) + len(new) > np.iinfo(dtype).max:
                raise InvalidEventError(
                    f"the {kind} vocabulary would exceed {np.iinfo(dtype).max} entries; "
                    "nothing written"
                )
        seq = c.last_seq + 1 + np.arange(m, dtype=np.int64)
        batch_seq = c.batch_seq + 1
        acc_hash = event_hash[acc]
        events_table = pa.table({
            "seq": seq,
            "batch_seq": np.full(m, batch_seq, dtype=np.int64),
            "applied_at": np.full(m, now),
            "topic": taken.column("topic"),
            "partition": taken.column("partition"),
            "offset": taken.column("offset"),
            "user_id": taken.column("user_id"),
            "item_idx": item_idx.astype(np.int32),
            "behaviour_idx": behaviour_idx.astype(np.int16),
            "timestamp": taken.column("timestamp"),
            "event_id": taken.column("event_id"),
            "event_hash": pa.array(acc_hash, mask=~has_id[acc]),
            "produced_ms": taken.column("produced_ms"),
        })
        commits_table = pa.table({
            "batch_seq": pa.array([batch_seq] * len(commit_rows), pa.int64()),
            "applied_at": pa.array([now] * len(commit_rows), pa.float64()),
            "topic": pa.array([r[0] for r in commit_rows], pa.string()),
            "partition": pa.array([r[1] for r in commit_rows], pa.int32()),
            "next_offset": pa.array([r[2] for r in commit_rows], pa.int64()),
            "n_applied": pa.array([r[3] for r in commit_rows], pa.int64()),
            "n_duplicates": pa.array([r[4] for r in commit_rows], pa.int64()),
        })

        inserts: list[tuple[str, str, pa.Table]] = []
        if new_behaviours:
            base = len(self._behaviours)
            inserts.append(("behaviours", "idx, name", pa.table({
                "idx": pa.array(range(base + 1, base + 1 + len(new_behaviours)), pa.int16()),
                "name": pa.array(new_behaviours, pa.string()),
            })))
        if new_items:
            base = len(self._items)
            inserts.append(("items", "idx, item_id, first_seq", pa.table({
                "idx": pa.array(np.arange(base + 1, base + 1 + len(new_items)), pa.int32()),
                "item_id": pa.array(new_items, pa.string()),
                "first_seq": seq[_first_positions(item_idx, base)],
            })))
        if m:
            inserts.append(("events", _EVENT_COLUMNS, events_table))
        if commit_rows:
            inserts.append(("commits", _COMMIT_COLUMNS, commits_table))
        self._append(inserts)

        # Committed: bring the mirror along (rebuilt from the file if this fails half-way).
        try:
            self._behaviours.commit(new_behaviours)
            self._items.commit(new_items)
            self._grow_popularity()
            np.add.at(self._popularity, (item_idx, behaviour_idx), 1)
            topic_lut = np.array([self._users.topic_code(t) for t in topic_names], dtype=np.int32)
            self._users.append(
                users,
                item_idx,
                behaviour_idx,
                seq,
                topic_lut[topic_idx[acc]] if m else np.zeros(0, np.int32),
                partition[acc],
                offset[acc],
                taken.column("timestamp").to_numpy(),
                taken.column("produced_ms").fill_null(MISSING).to_numpy(),
            )
            self._dedup.add(acc_hash[has_id[acc]], now)
            c.offsets.update(new_offsets)
            c.last_seq += m
            c.batch_seq = batch_seq
        except BaseException:
            log.exception("mirror update failed after a committed apply; reloading %s", self.path)
            self._load()
            raise
        return ApplyResult(
            applied=m,
            duplicate_offsets=result_dups[0],
            duplicate_event_ids=result_dups[1],
            touched_users=users[1],
            new_items=len(new_items),
            new_behaviours=list(new_behaviours),
            offsets=new_offsets,
            batch_seq=batch_seq,
        )

    def _grow_popularity(self) -> None:
        rows, cols = len(self._items) + 1, len(self._behaviours) + 1
        old_rows, old_cols = self._popularity.shape
        if rows <= old_rows and cols <= old_cols:
            return
        grown = np.zeros((max(rows, 2 * old_rows), max(cols, old_cols)), dtype=np.int64)
        grown[:old_rows, :old_cols] = self._popularity
        self._popularity = grown

    # -- folding the snapshots -----------------------------------------------------------------

    def fold(self) -> int:
        """Bring the snapshot tables (users, popularity) up to the last applied event.

        Runs by itself every `fold_events` events and on `close`; call it to bound the replay
        of the next open. Returns how many users were written.
        """
        with self._lock:
            self._writable()
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
                        f"INSERT INTO users ({_USER_COLUMNS}) SELECT {_USER_COLUMNS} FROM _fold_users"
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

        added = self._transaction(write)
        self._users.clear_dirty()
        c.folded_seq = upto
        c.popularity_rows += added
        if c.popularity_rows > 2 * max(c.popularity_rows_aggregated, 1):
            self._aggregate_popularity()
        self._dedup.expire(self._clock() - self.event_id_window_s)
        log.debug("folded %d users up to event %d of %s", rows.size, upto, self.path)
        return int(rows.size)

    def _aggregate_popularity(self) -> None:
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

        rows = self._transaction(write)
        self._counters.popularity_rows = self._counters.popularity_rows_aggregated = rows

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
        with self._lock:
            self.con  # noqa: B018 - raises when closed
            return self._users.gather(user_ids, width=width)

    def sample_training_sequences(
        self,
        n: int,
        *,
        seed: int,
        recent_fraction: float | None = None,
        recent_users: int | None = None,
        min_length: int = 1,
        width: int | None = None,
    ) -> Sequences:
        """A sample of users' sequences for fine-tuning: recently touched users first, then a
        uniform share of all users (so training does not forget the others).

        Args:
            n: users wanted (fewer when fewer users have `min_length` events).
            seed: seeds the random choice (same state + same seed = same sample).
            recent_fraction: share of `n` taken from recent users (default: the store's).
            recent_users: the recent share is drawn uniformly from this many most recently
                touched users (default: the store's; None: exactly the most recent users).
            min_length: only users with at least this many events in their sequence.
            width: columns of the arrays (default: `sequence_length`).

        Returns:
            `Sequences`: the recent users (newest first), then the uniform share.
        """
        if n < 0 or min_length < 0:
            raise ValueError("n and min_length must be >= 0")
        fraction = self.recent_fraction if recent_fraction is None else float(recent_fraction)
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {fraction}")
        pool_size = self.recent_users if recent_users is None else recent_users
        with self._lock:
            self.con  # noqa: B018 - raises when closed
            users = self._users
            held = len(users)
            eligible = np.flatnonzero(users.lengths[:held] >= min_length).astype(np.int64)
            k = min(int(n), eligible.size)
            n_recent = int(round(k * fraction))
            rng = np.random.default_rng(seed)
            recent = np.zeros(0, dtype=np.int64)
            if n_recent:
                pool = n_recent if pool_size is None else min(max(pool_size, n_recent),
                                                              eligible.size)
                last = users.last_seq[eligible]
                top = np.argpartition(-last, pool - 1)[:pool] if pool < eligible.size else (
                    np.arange(eligible.size))
                top = top[np.argsort(-last[top], kind="stable")]
                if pool > n_recent:
                    top = top[np.sort(rng.choice(pool, size=n_recent, replace=False))]
                recent = eligible[top]
            taken = np.zeros(held, dtype=bool)
            taken[recent] = True
            rest = eligible[~taken[eligible]]
            uniform = rng.choice(rest, size=k - n_recent, replace=False) if k > n_recent else (
                np.zeros(0, dtype=np.int64))
            rows = np.concatenate([recent, uniform.astype(np.int64)])
            return users.gather_rows(rows, width=width)

    def offsets(self, topic: str) -> dict[int, int]:
        """Stored next offset to read per partition of `topic` (seek there on assignment)."""
        with self._lock:
            self.con  # noqa: B018 - raises when closed
            return {p: o for (t, p), o in sorted(self._counters.offsets.items()) if t == topic}

    def reset_offset(self, topic: str, partition: int, to_offset: int, reason: str) -> int | None:
        """Move the stored next offset of (`topic`, `partition`) to `to_offset`, also backwards (the
        partition's log was replaced, e.g. a topic recreated: its offsets start again), and record
        the reset with `reason` in ``offset_resets``. Events already applied stay; new ones at any
        offset from `to_offset` on are applied (event ids still drop repeats). Returns the offset it
        replaced (None: there was none)."""
        with self._lock:
            self._writable()
            c = self._counters
            before = c.offsets.get((topic, partition))
            batch_seq = c.batch_seq + 1
            self._transaction(lambda con: con.execute(
                "INSERT INTO offset_resets VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [batch_seq, float(self._clock()), topic, partition, -1 if before is None else before,
                 int(to_offset), reason],
            ))
            c.offsets[(topic, partition)] = int(to_offset)
            c.batch_seq = batch_seq
            log.warning("stored offset of %s[%d] reset from %s to %d: %s", topic, partition, before, to_offset, reason)
            return before

    def offset_resets(self) -> list[dict[str, Any]]:
        """Every recorded offset reset, oldest first."""
        with self._lock:
            rows = self.con.execute(
                'SELECT reset_at, topic, "partition", from_offset, to_offset, reason FROM offset_resets ORDER BY batch_seq'
            ).fetchall()
        return [dict(zip(("reset_at", "topic", "partition", "from_offset", "to_offset", "reason"), r, strict=True))
                for r in rows]

    def known_event_ids(self, event_ids: Sequence[str]) -> np.ndarray:
        """Bool [n]: which of `event_ids` (non-null) the id memory holds (applied within the window)."""
        with self._lock:
            return self._dedup.contains(hash_ids(list(event_ids)))

    def applied_events_by_id(self, event_ids: Sequence[str]) -> dict[str, tuple[str, str, str, float]]:
        """(user_id, item_id, behavior, timestamp) of the applied event of each id in `event_ids`
        that the events table still holds (trimmed ones are absent). For the rare ids seen twice,
        not a hot path (one scan of the events table)."""
        if not event_ids:
            return {}
        wanted = pa.table({"h": hash_ids(list(event_ids)), "event_id": pa.array(list(event_ids), pa.string())})
        with self._lock:
            con = self.con
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

    def all_offsets(self) -> dict[tuple[str, int], int]:
        """Stored next offset to read per (topic, partition)."""
        with self._lock:
            return dict(sorted(self._counters.offsets.items()))

    def item_ids(self) -> list[str]:
        """External item ids: position i holds the id of item index i + 1."""
        with self._lock:
            return list(self._items.names)

    def behaviour_names(self) -> list[str]:
        """Behaviour names: position i holds the name of behaviour index i + 1."""
        with self._lock:
            return list(self._behaviours.names)

    def num_items(self) -> int:
        """Items in the vocabulary (the highest item index)."""
        return len(self._items)

    def user_ids(self) -> list[str]:
        """Every user with at least one applied event, in order of first appearance. (The
        `users` table is a snapshot as of the last fold and may lack the newest users.)"""
        with self._lock:
            self.con  # noqa: B018 - raises when closed
            return list(self._users.user_ids)

    def num_users(self) -> int:
        """Users with at least one applied event."""
        return len(self._users)

    def item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        """1-based indices of `item_ids`, int64 [n]; 0 for ids not in the vocabulary."""
        with self._lock:
            get = self._items.index.get
            return np.fromiter((get(i, 0) for i in item_ids), dtype=np.int64, count=len(item_ids))

    def item_popularity(self, behaviours: Sequence[str] | None = None) -> np.ndarray:
        """Applied events per item, int64 [num_items + 1] (index 0 is 0).

        Args:
            behaviours: count only events of these behaviours (default: all).

        Raises:
            ValueError: a behaviour name is not in the vocabulary.
        """
        with self._lock:
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
        with self._lock:
            c = self._counters
            held = self.con.execute("SELECT count(*) FROM events").fetchall()[0][0]
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

    # -- partitions ----------------------------------------------------------------------------

    def partitions(self) -> list[tuple[str, int]]:
        """(topic, partition) pairs the store holds offsets for."""
        with self._lock:
            return sorted(self._counters.offsets)

    def export_partition(self, topic: str, partition: int) -> dict[str, pa.Table]:
        """One partition's whole state, with external ids (portable to another store):
        tables meta, items, users, events, event_ids, popularity, published (see
        `state.partitions`)."""
        with self._lock:
            if not self.read_only:
                self._fold()
            elif self._counters.last_seq != self._counters.folded_seq:
                raise ReadOnlyStoreError(
                    f"{self.path} has events not folded into its snapshot; export it from the "
                    "writer (or after the writer closed it)"
                )
            return partition_io.export_partition(
                self.con, topic, int(partition), self._counters.offsets.get((topic, int(partition))),
                self.sequence_length, self._clock() - self.event_id_window_s,
            )

    def import_partition(self, tables: Mapping[str, pa.Table], *, replace: bool = False) -> int:
        """Add a partition exported by `export_partition` (from this or another store), in one
        transaction; items and behaviours unknown here are appended to the vocabularies.

        Args:
            tables: output of `export_partition`.
            replace: drop this store's state of the partition first (else it must hold none).

        Returns:
            Users imported.

        Raises:
            PartitionError: the store holds the partition (and not `replace`), or a user of the
                export is held here on another partition.
        """
        with self._lock:
            self._writable()
            self._fold()
            count = self._transaction(lambda con: partition_io.import_partition(
                con, tables, replace=replace, open_vocabulary=self.open_vocabulary,
                now=self._clock(),
            ))
            self._load()
            return count

    def drop_partition(self, topic: str, partition: int) -> int:
        """Delete everything held for one partition (after it moved to another instance):
        its users, events, offsets, popularity, remembered ids and published recommendations.
        The vocabularies keep their entries. Returns users dropped."""
        with self._lock:
            self._writable()
            self._fold()
            count = self._transaction(
                lambda con: partition_io.drop_partition(con, topic, int(partition))
            )
            self._load()
            return count


def _first_positions(item_idx: np.ndarray, base: int) -> np.ndarray:
    """Positions in the batch of the first event of each new item (indices > base), in index
    order."""
    new = np.flatnonzero(item_idx > base)
    _, first = np.unique(item_idx[new], return_index=True)
    return new[first]
