"""The store's schema and its migrations.

The schema is a list of `Migration` steps; a file's version is the highest step applied to it,
recorded (one row per step) in the table `schema_version`. Opening a file runs the missing steps,
each in its own transaction together with its `schema_version` row, so a crash during an upgrade
leaves the file at a whole step. A file whose version is higher than `SCHEMA_VERSION` was
written by newer code and is refused (`SchemaVersionError`).

Column conventions: `"partition"` and `"offset"` are quoted (SQL keywords); times are unix
seconds (DOUBLE) unless the name ends in `_ms`; `seq` is the store-wide arrival number of an
applied event (1, 2, ...), `batch_seq` the number of the `apply` that wrote a row.

Tables (version 1, the event state):
    behaviours   behaviour vocabulary: idx (1-based, SMALLINT), name.
    items        item vocabulary: idx (1-based, INTEGER), item_id, first_seq.
    events       applied events (trimmed by retention); the log the state is derived from.
    commits      one row per (apply, topic, partition): next offset to read, counts.
    event_ids    event ids remembered after their events were trimmed (dedup window).
    users        snapshot of every user's rolling sequence as of `counters.folded_seq`.
    popularity   snapshot of event counts per (topic, partition, item, behaviour), same point.
    counters     one row: folded_seq (events with seq <= it are in the snapshots), batch_seq.
Tables (version 2, the registry and logs):
    models, alpha_history, drift_log, published.
Tables (version 3):
    component_state  opaque saved state of a named component (e.g. the drift detectors), with
                     the applied-event count it was saved at.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import duckdb

from state.errors import SchemaVersionError, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One schema step: the statements that take a file from `version - 1` to `version`."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "event state: vocabularies, events, offsets, rolling sequences, popularity",
        (
            """CREATE TABLE behaviours (
                idx SMALLINT NOT NULL,
                name VARCHAR NOT NULL
            )""",
            """CREATE TABLE items (
                idx INTEGER NOT NULL,
                item_id VARCHAR NOT NULL,
                first_seq BIGINT
            )""",
            """CREATE TABLE events (
                seq BIGINT NOT NULL,
                batch_seq BIGINT NOT NULL,
                applied_at DOUBLE NOT NULL,
                topic VARCHAR NOT NULL,
                "partition" INTEGER NOT NULL,
                "offset" BIGINT NOT NULL,
                user_id VARCHAR NOT NULL,
                item_idx INTEGER NOT NULL,
                behaviour_idx SMALLINT NOT NULL,
                timestamp DOUBLE NOT NULL,
                event_id VARCHAR,
                event_hash BIGINT,
                produced_ms BIGINT
            )""",
            """CREATE TABLE commits (
                batch_seq BIGINT NOT NULL,
                applied_at DOUBLE NOT NULL,
                topic VARCHAR NOT NULL,
                "partition" INTEGER NOT NULL,
                next_offset BIGINT NOT NULL,
                n_applied BIGINT NOT NULL,
                n_duplicates BIGINT NOT NULL
            )""",
            """CREATE TABLE event_ids (
                event_hash BIGINT NOT NULL,
                event_id VARCHAR NOT NULL,
                topic VARCHAR NOT NULL,
                "partition" INTEGER NOT NULL,
                "offset" BIGINT NOT NULL,
                applied_at DOUBLE NOT NULL
            )""",
            """CREATE TABLE users (
                user_id VARCHAR NOT NULL,
                topic VARCHAR NOT NULL,
                "partition" INTEGER NOT NULL,
                items INTEGER[] NOT NULL,
                behaviours SMALLINT[] NOT NULL,
                n_events BIGINT NOT NULL,
                first_seq BIGINT NOT NULL,
                last_seq BIGINT NOT NULL,
                last_timestamp DOUBLE NOT NULL,
                last_offset BIGINT NOT NULL,
                last_produced_ms BIGINT
            )""",
            """CREATE TABLE popularity (
                topic VARCHAR NOT NULL,
                "partition" INTEGER NOT NULL,
                item_idx INTEGER NOT NULL,
                behaviour_idx SMALLINT NOT NULL,
                count BIGINT NOT NULL
            )""",
            """CREATE TABLE counters (
                folded_seq BIGINT NOT NULL,
                batch_seq BIGINT NOT NULL,
                folded_at DOUBLE
            )""",
            "INSERT INTO counters VALUES (0, 0, NULL)",
        ),
    ),
    Migration(
        2,
        "model registry, alpha history, drift log, last published recommendations",
        (
            """CREATE TABLE models (
                version INTEGER PRIMARY KEY,
                created_at DOUBLE NOT NULL,
                alpha VARCHAR NOT NULL,
                metrics VARCHAR NOT NULL,
                checkpoint_path VARCHAR NOT NULL,
                registered_at DOUBLE NOT NULL
            )""",
            """CREATE TABLE alpha_history (
                n BIGINT NOT NULL,
                happened_at DOUBLE NOT NULL,
                alpha VARCHAR NOT NULL,
                reason VARCHAR NOT NULL
            )""",
            """CREATE TABLE drift_log (
                n BIGINT NOT NULL,
                happened_at DOUBLE NOT NULL,
                behaviour VARCHAR NOT NULL,
                detector VARCHAR NOT NULL,
                signal VARCHAR NOT NULL,
                value DOUBLE NOT NULL,
                old_alpha DOUBLE NOT NULL,
                new_alpha DOUBLE NOT NULL
            )""",
            """CREATE TABLE published (
                user_id VARCHAR NOT NULL,
                topic VARCHAR,
                "partition" INTEGER,
                model_version INTEGER NOT NULL,
                items VARCHAR[] NOT NULL,
                published_at DOUBLE NOT NULL,
                event_offset BIGINT
            )""",
        ),
    ),
    Migration(
        3,
        "saved state of components (drift detectors and policy)",
        (
            """CREATE TABLE component_state (
                name VARCHAR PRIMARY KEY,
                saved_at DOUBLE NOT NULL,
                events_applied BIGINT NOT NULL,
                state BLOB NOT NULL
            )""",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        4,
        "offset resets: a partition re-read from its new log start (topic recreated, cluster replaced)",
        (
            """CREATE TABLE offset_resets (
                batch_seq BIGINT NOT NULL,
                reset_at DOUBLE NOT NULL,
                topic VARCHAR NOT NULL,
                "partition" INTEGER NOT NULL,
                from_offset BIGINT NOT NULL,
                to_offset BIGINT NOT NULL,
                reason VARCHAR NOT NULL
            )""",
        ),
    ),
)

SCHEMA_VERSION: int = MIGRATIONS[-1].version


def _table_names(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_name FROM duckdb_tables() "
        "WHERE database_name = current_database() AND schema_name = 'main'"
    ).fetchall()
    return {r[0] for r in rows}


def file_version(con: duckdb.DuckDBPyConnection) -> int | None:
    """The schema version of the open database: None for an empty database (no tables).

    Raises:
        StoreError: the database holds tables but no `schema_version` (not a casm-stream file).
    """
    tables = _table_names(con)
    if "schema_version" not in tables:
        if tables:
            raise StoreError(
                f"the DuckDB file holds tables ({', '.join(sorted(tables)[:5])}, ...) but no "
                "schema_version table: it is not a casm-stream state file"
            )
        return None
    version = con.execute("SELECT max(version) FROM schema_version").fetchall()[0][0]
    return int(version) if version is not None else 0


def migrate(
    con: duckdb.DuckDBPyConnection,
    *,
    path: str,
    read_only: bool = False,
    target: int = SCHEMA_VERSION,
) -> int:
    """Bring the open database to schema version `target` (default: the latest).

    Args:
        con: open connection to the database.
        path: the file's name, for messages.
        read_only: the connection cannot write; an upgrade is refused instead of run.
        target: version to reach; lower than the latest only to build old files in tests.

    Returns:
        The version the file had before (0 for a new file).

    Raises:
        SchemaVersionError: the file is newer than this code, or needs an upgrade while read-only.
    """
    found = file_version(con)
    before = found or 0
    if before > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"state file {path} has schema version {before}, newer than the {SCHEMA_VERSION} this "
            "casm-stream knows; upgrade casm-stream (or use another file)"
        )
    if before >= target:
        return before
    if read_only:
        raise SchemaVersionError(
            f"state file {path} has schema version {before} and needs an upgrade to "
            f"{target}; open it once read-write to upgrade it"
        )
    if found is None:
        con.execute(
            "CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at DOUBLE NOT NULL, "
            "description VARCHAR NOT NULL)"
        )
    for step in MIGRATIONS:
        if step.version <= before or step.version > target:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            for statement in step.statements:
                con.execute(statement)
            con.execute(
                "INSERT INTO schema_version VALUES (?, ?, ?)",
                [step.version, time.time(), step.description],
            )
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
        log.info("state file %s: schema upgraded to version %d (%s)", path, step.version,
                 step.description)
    return before
