"""`Database`: the store's DuckDB file: the connection, the one-writer rule, transactions,
migrations and set-based appends. It knows tables, not events: the event store, the registry and
retention write through it.

One writer per file: DuckDB locks the file against other processes; a second writer in this
process (DuckDB would hand it the same database) is refused here. Either way the caller gets
`StoreLockedError` naming the file. Calls are serialised by `lock` (a re-entrant lock the
collaborators share), so one store may be used from several threads.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from state.errors import ReadOnlyStoreError, StoreClosedError, StoreError, StoreLockedError
from state.schema import migrate

log = logging.getLogger(__name__)

MEMORY = ":memory:"
#: Tables one `append` may write (one replacement-scan variable each).
MAX_APPENDS = 4
_LOCK_PID = re.compile(r"\(PID (\d+)\)")

_open_writers: set[str] = set()
_open_writers_lock = threading.Lock()


class Database:
    """An open, migrated DuckDB state file.

    Args:
        path: DuckDB file, or ":memory:" (private to this object, for tests).
        read_only: open without writing (fails while another process writes the file).
        duck_config: DuckDB settings (threads, memory_limit, checkpoint_threshold, fsync_mode).

    Raises:
        StoreLockedError: another writer holds the file.
        SchemaVersionError: the file is newer than this code (or read-only and older).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False,
                 duck_config: Mapping[str, Any] | None = None):
        self.memory = str(path) == MEMORY
        self.path: str = MEMORY if self.memory else str(Path(path).expanduser().resolve())
        self.read_only = read_only
        self.lock = threading.RLock()
        self._duck_config = dict(duck_config or {})
        self._con: duckdb.DuckDBPyConnection | None = None
        self._registered_writer = False
        self._connect()
        try:
            migrate(self._con, path=self.path, read_only=read_only)
        except BaseException:
            self.close()
            raise

    # -- connection ----------------------------------------------------------------------------

    def _connect(self) -> None:
        if not self.memory and not self.read_only:
            with _open_writers_lock:
                if self.path in _open_writers:
                    raise StoreLockedError(self.path, "already open for writing in this process")
                _open_writers.add(self.path)
                self._registered_writer = True
        try:
            if not self.memory:
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

    def close(self) -> None:
        """Close the connection and free the file (nothing is folded: see `StateStore.close`).
        Idempotent."""
        if self._con is not None:
            try:
                self._con.close()
            finally:
                self._con = None
        self._release_writer()

    @property
    def in_use(self) -> bool:
        """True while a connection or the writer slot is held (until `close`)."""
        return self._con is not None or self._registered_writer

    @property
    def closed(self) -> bool:
        return self._con is None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection (for reads; writes go through `transaction` or `append`).

        Raises:
            StoreClosedError: after `close`.
        """
        if self._con is None:
            raise StoreClosedError(f"state store {self.path} is closed")
        return self._con

    def writable(self) -> duckdb.DuckDBPyConnection:
        """The connection, for a write.

        Raises:
            StoreClosedError: after `close`.
            ReadOnlyStoreError: opened read-only.
        """
        con = self.con
        if self.read_only:
            raise ReadOnlyStoreError(f"state store {self.path} is open read-only")
        return con

    # -- writes --------------------------------------------------------------------------------

    def transaction(self, body: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        """Run `body(con)` in one transaction and return what it returns; roll back and re-raise
        on any error (a DuckDB error as `StoreError`)."""
        with self.lock:
            con = self.writable()
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

    def append(self, inserts: Sequence[tuple[str, str, pa.Table]]) -> None:
        """Append Arrow tables to tables, all in one transaction sent as one DuckDB call.

        Args:
            inserts: (table, column list, data) each, at most `MAX_APPENDS`. The data are read
                through DuckDB's replacement scan of this frame's locals `_t0` .. `_t3`, which
                saves a register / unregister round trip per table (about 1 ms each on the
                benchmark machine, where a whole apply of 1,000 events takes 10-20 ms).

        Raises:
            StoreError: the write failed; nothing of it is in the file.
        """
        if len(inserts) > MAX_APPENDS:
            raise ValueError(f"at most {MAX_APPENDS} tables per append")
        with self.lock:
            con = self.writable()
            _t0, _t1, _t2, _t3 = [data for _, _, data in inserts] + [None] * (
                MAX_APPENDS - len(inserts))
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

    def rewrite(self) -> tuple[int, int]:
        """Checkpoint and rewrite the file without the space of deleted rows (DuckDB reuses free
        blocks but never shrinks a file by itself): copy the database to `<file>.compact` and
        rename it over the file; the lock is released for the instant of the swap.

        Returns:
            (bytes before, bytes after); (0, 0) for ":memory:".
        """
        with self.lock:
            con = self.writable()
            con.execute("CHECKPOINT")
            if self.memory:
                return 0, 0
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
            con.close()
            self._con = None
            try:
                os.replace(tmp, self.path)
            finally:
                self._con = duckdb.connect(self.path, config=dict(self._duck_config))
            migrate(self._con, path=self.path)
            return before, os.path.getsize(self.path)


def _sql_str(value: str) -> str:
    return value.replace("'", "''")
