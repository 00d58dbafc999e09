"""Retention and compaction of the store: trimming old events without touching the state
derived from them, forgetting old event ids, and rewriting the file to give space back.
Mixed into `StateStore`."""

from __future__ import annotations

import logging
import os

import duckdb

from state.errors import StoreError
from state.schema import migrate

log = logging.getLogger(__name__)


class RetentionMixin:
    """Retention and compaction methods of `StateStore` (they use its connection, lock, fold
    and id memory)."""

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
        with self._lock:
            con = self._writable()
            self._fold()
            window_cut = self._clock() - self.event_id_window_s
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
                con.execute("DELETE FROM event_ids WHERE applied_at < $1", [window_cut])
                con.execute(
                    "DELETE FROM commits c WHERE c.batch_seq < "
                    "(SELECT coalesce(min(batch_seq), 9223372036854775807) FROM events) "
                    "AND c.batch_seq < (SELECT max(d.batch_seq) FROM commits d "
                    'WHERE d.topic = c.topic AND d."partition" = c."partition")'
                )
                return int(removed)

            removed = self._transaction(write)
            self._dedup.expire(window_cut)
            log.info("trimmed %d events from %s", removed, self.path)
            return removed

    def retain(self) -> int:
        """`trim` with the configured retention (`retention_s`, `retention_rows`); also forgets
        event ids older than the id window. Returns events deleted."""
        with self._lock:
            if self.retention_s is None and self.retention_rows is None:
                self._expire_ids()
                return 0
            return self.trim(self.retention_s, self.retention_rows)

    def _expire_ids(self) -> None:
        cutoff = self._clock() - self.event_id_window_s
        self._transaction(
            lambda con: con.execute("DELETE FROM event_ids WHERE applied_at < $1", [cutoff])
        )
        self._dedup.expire(cutoff)

    def compact(self) -> dict[str, int]:
        """Fold, re-aggregate popularity, checkpoint and rewrite the file without the space of
        deleted rows (DuckDB reuses free blocks but never shrinks a file by itself).

        The rewrite copies the database to `<file>.compact` and renames it over the file; the
        lock is released for the instant of the swap. Returns {"bytes_before", "bytes_after"}
        (0 for ":memory:").
        """
        with self._lock:
            con = self._writable()
            self._fold()
            self._aggregate_popularity()
            self._expire_ids()
            con.execute("CHECKPOINT")
            if self._memory:
                return {"bytes_before": 0, "bytes_after": 0}
            before = os.path.getsize(self.path)
            tmp = self.path + ".compact"
            for leftover in (tmp, tmp + ".wal"):
                if os.path.exists(leftover):
                    os.remove(leftover)
            name = con.execute("SELECT current_database()").fetchall()[0][0]
            con.execute(f"ATTACH '{_sql_str(tmp)}' AS _compact")
            try:
                con.execute(f'COPY FROM DATABASE "{name}" TO _compact')
                con.execute("CHECKPOINT _compact")
            except BaseException:
                con.execute("DETACH _compact")
                os.remove(tmp)
                raise
            con.execute("DETACH _compact")
            if os.path.exists(tmp + ".wal"):  # the copy must be whole in the file itself
                os.remove(tmp)
                raise StoreError(f"compaction of {self.path} left a WAL behind; file unchanged")
            self._con.close()
            self._con = None
            try:
                os.replace(tmp, self.path)
            finally:
                self._con = duckdb.connect(self.path, config=dict(self._duck_config))
            migrate(self._con, path=self.path)
            after = os.path.getsize(self.path)
            log.info("compacted %s: %d -> %d bytes", self.path, before, after)
            return {"bytes_before": before, "bytes_after": after}


def _sql_str(value: str) -> str:
    return value.replace("'", "''")
