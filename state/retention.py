"""`Retention`: trimming old events without touching the state derived from them, forgetting
old event ids, and compacting the file to give space back."""

from __future__ import annotations

import logging

import duckdb

from state.database import Database
from state.events import EventStore

log = logging.getLogger(__name__)


class Retention:
    """Retention and compaction of a store's file.

    Args:
        db: the open file.
        events: the event store (folded before anything is trimmed; owns the id memory).
        retention_s: `retain()` trims events older than this (event time, s); None keeps all.
        retention_rows: `retain()` keeps at most this many newest events; None keeps all.
    """

    def __init__(self, db: Database, events: EventStore, *, retention_s: float | None = None,
                 retention_rows: int | None = None):
        self._db = db
        self._events = events
        self.retention_s = retention_s
        self.retention_rows = retention_rows

    def trim(
        self,
        max_age_s: float | None = None,
        max_rows: int | None = None,
        *,
        now: float | None = None,
    ) -> int:
        """Delete old applied events; sequences, popularity, vocabularies, offsets and the
        event-id memory are untouched (ids of trimmed events inside the id window move to the
        `event_ids` table, so retries of them are still dropped).

        Args:
            max_age_s: delete events whose event time is more than this before `now` (s).
            max_rows: keep at most this many newest (by arrival) events.
            now: reference time for the age, unix s (default: the newest event time held, so
                replaying an old log does not trim everything).

        Returns:
            Events deleted.
        """
        if max_age_s is not None and max_age_s < 0:
            raise ValueError("max_age_s must be >= 0")
        if max_rows is not None and max_rows < 0:
            raise ValueError("max_rows must be >= 0")
        with self._db.lock:
            con = self._db.writable()
            self._events.fold()
            window_cut = self._events.id_window_start()
            conditions: list[str] = []
            if max_age_s is not None:
                reference = now
                if reference is None:
                    reference = con.execute("SELECT max(timestamp) FROM events").fetchall()[0][0]
                if reference is not None:
                    conditions.append(f"timestamp < {float(reference) - float(max_age_s)!r}")
            if max_rows is not None:
                row = con.execute(
                    "SELECT seq FROM events ORDER BY seq DESC LIMIT 1 OFFSET $1", [max_rows]
                ).fetchall()
                if row:
                    conditions.append(f"seq <= {int(row[0][0])}")
            if not conditions:
                return 0
            doomed = " OR ".join(f"({cond})" for cond in conditions)

            def write(con: duckdb.DuckDBPyConnection) -> int:
                con.execute(
                    'INSERT INTO event_ids SELECT event_hash, event_id, topic, "partition", '
                    f'"offset", applied_at FROM events WHERE ({doomed}) '
                    "AND event_hash IS NOT NULL AND applied_at >= $1",
                    [window_cut],
                )
                removed = con.execute(f"DELETE FROM events WHERE {doomed}").fetchall()[0][0]
                con.execute(
                    "DELETE FROM commits c WHERE c.batch_seq < "
                    "(SELECT coalesce(min(batch_seq), 9223372036854775807) FROM events) "
                    "AND c.batch_seq < (SELECT max(d.batch_seq) FROM commits d "
                    'WHERE d.topic = c.topic AND d."partition" = c."partition")'
                )
                return int(removed)

            removed = self._db.transaction(write)
            self._events.forget_ids(window_cut)
            log.info("trimmed %d events from %s", removed, self._db.path)
            return removed

    def retain(self) -> int:
        """`trim` with the configured retention (`retention_s`, `retention_rows`); also forgets
        event ids older than the id window. Returns events deleted."""
        with self._db.lock:
            if self.retention_s is None and self.retention_rows is None:
                self._db.writable()
                self._events.forget_ids(self._events.id_window_start())
                return 0
            return self.trim(self.retention_s, self.retention_rows)

    def compact(self) -> dict[str, int]:
        """Fold, re-aggregate popularity, forget expired ids, checkpoint and rewrite the file
        without the space of deleted rows (see `Database.rewrite`).

        Returns:
            {"bytes_before", "bytes_after"} (0 for ":memory:").
        """
        with self._db.lock:
            self._db.writable()
            self._events.fold()
            self._events.aggregate_popularity()
            self._events.forget_ids(self._events.id_window_start())
            before, after = self._db.rewrite()
            if before:
                log.info("compacted %s: %d -> %d bytes", self._db.path, before, after)
            return {"bytes_before": before, "bytes_after": after}
