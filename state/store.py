"""`StateStore`: the service's durable state in one DuckDB file, applied exactly once.

A composition of four collaborators that share one file and one lock and never reach into each
other:

* `db` (`state.database.Database`): the connection, the one-writer rule, transactions,
  migrations, set-based appends, the file rewrite.
* `events` (`state.events.EventStore`): `apply` (exactly once: see there), the in-memory mirror
  (vocabularies, offsets, id memory, popularity, rolling sequences), folding, and every read of
  the event state.
* `registry` (`state.registry.Registry`): model versions, alpha history, drift log, component
  state, published lists.
* `retention` (`state.retention.Retention`): `trim`, `retain`, `compact`.

The event store's methods are also the store's own (one-line delegations): they are what every
consumer calls on the hot path (`apply`, `sequences`, `offsets`, the vocabularies), and the
store *is* chiefly its events. Registry and retention are reached through their attributes
(`store.registry.record_published(...)`, `store.retention.retain()`), so the store's own surface
stays the event state plus open/close.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from state.config import StoreConfig
from state.database import MEMORY, Database
from state.events import ApplyResult, EventStore, UserActivity
from state.registry import Registry
from state.retention import Retention
from state.sequences import Sequences

__all__ = ["MEMORY", "ApplyResult", "StateStore"]

_DEFAULTS = StoreConfig()
#: Same default as stream.config.EventLimits.max_id_length (state may not import stream).
DEFAULT_MAX_ID_LENGTH = 128
_SECONDS_PER_DAY = 86_400.0


class StateStore:
    """The DuckDB store of events, rolling user sequences, vocabularies, offsets and registry.

    Args:
        path: DuckDB file, or ":memory:" (private to this store, for tests).
        behaviours: configured behaviour vocabulary, in index order (index 1 first). The file's
            vocabulary must start with it, or it must start with the file's (the rest is added).
        sequence_length: N, events kept per user (the newest N).
        open_vocabulary: accept unknown behaviours (appended to the vocabulary) instead of refusing.
        max_id_length: longest behaviour name (characters) the vocabulary takes.
        read_only: open without writing (fails while another process writes the file).
        threads: DuckDB threads (0: DuckDB's default).
        memory_limit: DuckDB memory_limit, e.g. "2GB".
        checkpoint_threshold: DuckDB checkpoint_threshold, e.g. "16MB".
        fsync_mode: DuckDB fsync_mode: "STANDARD" (sync the WAL at each commit), "NONE" (leave
            it to the OS: still exactly-once across process crashes, not across OS crashes) or
            "FULL".
        event_id_window_s: seconds an applied event_id is remembered (wall clock).
        fold_events: applied events between two folds of the snapshot tables.
        retention_s: `retention.retain()` trims events older than this (event time, s); None
            keeps all.
        retention_rows: `retention.retain()` keeps at most this many newest events; None keeps
            all.
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
        read_only: bool = False,
        threads: int = _DEFAULTS.threads,
        memory_limit: str | None = _DEFAULTS.memory_limit,
        checkpoint_threshold: str | None = _DEFAULTS.checkpoint_threshold,
        fsync_mode: str = _DEFAULTS.fsync_mode,
        event_id_window_s: float = _DEFAULTS.event_id_window_s,
        fold_events: int = _DEFAULTS.fold_events,
        retention_s: float | None = None,
        retention_rows: int | None = _DEFAULTS.retention_rows,
        clock: Callable[[], float] = time.time,
    ):
        duck_config = {
            key: value
            for key, value in (
                ("threads", threads or None),
                ("memory_limit", memory_limit),
                ("checkpoint_threshold", checkpoint_threshold),
                ("fsync_mode", fsync_mode),
            )
            if value is not None
        }
        self.db = Database(path, read_only=read_only, duck_config=duck_config)
        try:
            self.events = EventStore(
                self.db, behaviours=behaviours, sequence_length=sequence_length,
                open_vocabulary=open_vocabulary, max_id_length=max_id_length,
                event_id_window_s=event_id_window_s, fold_events=fold_events, clock=clock,
            )
        except BaseException:
            self.db.close()
            raise
        self.registry = Registry(self.db, self.events.sequences, clock)
        self.retention = Retention(self.db, self.events, retention_s=retention_s,
                                   retention_rows=retention_rows)

    @classmethod
    def from_config(
        cls,
        cfg: StoreConfig,
        *,
        behaviours: Sequence[str],
        open_vocabulary: bool = False,
        max_id_length: int = DEFAULT_MAX_ID_LENGTH,
        read_only: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> StateStore:
        """A store configured from the `store` settings section."""
        return cls(
            cfg.path,
            behaviours=behaviours,
            sequence_length=cfg.sequence_length,
            open_vocabulary=open_vocabulary,
            max_id_length=max_id_length,
            read_only=read_only,
            threads=cfg.threads,
            memory_limit=cfg.memory_limit,
            checkpoint_threshold=cfg.checkpoint_threshold,
            fsync_mode=cfg.fsync_mode,
            event_id_window_s=cfg.event_id_window_s,
            fold_events=cfg.fold_events,
            retention_s=None if cfg.retention_days is None else cfg.retention_days * _SECONDS_PER_DAY,
            retention_rows=cfg.retention_rows,
            clock=clock,
        )

    # -- open / close --------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The file's resolved path (or ":memory:")."""
        return self.db.path

    @property
    def read_only(self) -> bool:
        return self.db.read_only

    @property
    def sequence_length(self) -> int:
        return self.events.sequence_length

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection (for read-only inspection; do not write through it)."""
        return self.db.con

    @property
    def closed(self) -> bool:
        return self.db.closed

    def close(self) -> None:
        """Fold pending state (when writable) and close the file. Idempotent."""
        with self.db.lock:
            if self.db.closed:
                self.db.close()
                return
            try:
                if not self.db.read_only:
                    self.events.fold()
            finally:
                self.db.close()

    def __del__(self) -> None:
        # A store dropped without close(): free the file (no fold; the next open replays).
        db = self.__dict__.get("db")
        if db is not None and db.in_use:
            try:
                db.close()
            except Exception:  # noqa: BLE001 - never raise from a finaliser
                pass

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the event store (see `state.events.EventStore`) --------------------------------------

    def apply(self, events: pa.Table, offsets: Mapping[tuple[str, int], int] | None = None, *,
              before_width: int | None = None) -> ApplyResult:
        """`EventStore.apply`: one batch and its offsets, in one transaction."""
        return self.events.apply(events, offsets, before_width=before_width)

    def release(self, partitions: Sequence[tuple[str, int]]) -> int:
        """Forget the state of (topic, partition) pairs, their published lists included (see
        `EventStore.release`); returns the events removed."""
        return self.events.release(partitions, extra_tables=("published",))

    def sequences(self, user_ids: Sequence[str], *, width: int | None = None) -> Sequences:
        """`EventStore.sequences`: padded windows int64 [n, width] and each newest event."""
        return self.events.sequences(user_ids, width=width)

    def activity(self) -> UserActivity:
        """`EventStore.activity`: every user's sequence length and recency."""
        return self.events.activity()

    def offsets(self, topic: str) -> dict[int, int]:
        """`EventStore.offsets`: stored next offset per partition of `topic`."""
        return self.events.offsets(topic)

    def all_offsets(self) -> dict[tuple[str, int], int]:
        """`EventStore.all_offsets`: stored next offset per (topic, partition)."""
        return self.events.all_offsets()

    def reset_offset(self, topic: str, partition: int, to_offset: int, reason: str) -> int | None:
        """`EventStore.reset_offset`: move a stored offset (also backwards), recorded."""
        return self.events.reset_offset(topic, partition, to_offset, reason)

    def offset_resets(self) -> list[dict[str, Any]]:
        """`EventStore.offset_resets`: every recorded reset, oldest first."""
        return self.events.offset_resets()

    def known_event_ids(self, event_ids: Sequence[str]) -> np.ndarray:
        """`EventStore.known_event_ids`: bool [n], ids the id memory holds."""
        return self.events.known_event_ids(event_ids)

    def applied_events_by_id(
        self, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, str, str, float]]:
        """`EventStore.applied_events_by_id`: the applied event of each id still held."""
        return self.events.applied_events_by_id(event_ids)

    def item_ids(self) -> list[str]:
        """`EventStore.item_ids`: position i holds the id of item index i + 1."""
        return self.events.item_ids()

    def behaviour_names(self) -> list[str]:
        """`EventStore.behaviour_names`: position i holds behaviour index i + 1."""
        return self.events.behaviour_names()

    def num_items(self) -> int:
        """`EventStore.num_items`: the highest item index."""
        return self.events.num_items()

    def item_index(self, item_ids: Sequence[str]) -> np.ndarray:
        """`EventStore.item_index`: 1-based indices int64 [n], 0 for unknown ids."""
        return self.events.item_index(item_ids)

    def item_popularity(self, behaviours: Sequence[str] | None = None) -> np.ndarray:
        """`EventStore.item_popularity`: events per item, int64 [num_items + 1]."""
        return self.events.item_popularity(behaviours)

    def user_ids(self) -> list[str]:
        """`EventStore.user_ids`: users with applied events, in order of first appearance."""
        return self.events.user_ids()

    def num_users(self) -> int:
        """`EventStore.num_users`: users with applied events."""
        return self.events.num_users()

    def partitions(self) -> list[tuple[str, int]]:
        """`EventStore.partitions`: (topic, partition) pairs with a stored offset."""
        return self.events.partitions()

    def fold(self) -> int:
        """`EventStore.fold`: bring the snapshot tables up to date; users written."""
        return self.events.fold()

    def stats(self) -> dict[str, int]:
        """`EventStore.stats`: sizes."""
        return self.events.stats()
