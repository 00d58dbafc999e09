"""Schema versions: new files get the latest, older ones are upgraded, newer ones refused."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb
import pytest

from state import SCHEMA_VERSION, SchemaVersionError, StoreError
from state.schema import MIGRATIONS, file_version, migrate
from tests.state._synth import TOPIC, open_store, simple


def _versions(path: Path) -> list[int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return [r[0] for r in con.execute(
            "SELECT version FROM schema_version ORDER BY version").fetchall()]
    finally:
        con.close()


def test_migrations_are_numbered_one_by_one() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert SCHEMA_VERSION == MIGRATIONS[-1].version >= 2


def test_new_file_gets_every_step(tmp_path: Path) -> None:
    path = tmp_path / "new.duckdb"
    open_store(path).close()
    assert _versions(path) == list(range(1, SCHEMA_VERSION + 1))


def test_version_1_file_is_upgraded_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, path=str(path), target=1) == 0
    assert file_version(con) == 1
    # A v1 file with state in it (as version-1 code would have written it).
    con.execute("INSERT INTO behaviours VALUES (1, 'pv'), (2, 'cart'), (3, 'fav'), (4, 'buy')")
    con.execute("INSERT INTO items VALUES (1, 'x', 1)")
    con.execute("INSERT INTO events VALUES (1, 1, $1, 'behaviours', 0, 0, 'a', 1, 1, "
                "1700000000.0, 'e0', NULL, NULL)", [time.time()])
    con.execute("INSERT INTO commits VALUES (1, $1, 'behaviours', 0, 1, 1, 0)", [time.time()])
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "models" not in tables
    con.close()

    with open_store(path) as store:
        assert _versions_open(store) == list(range(1, SCHEMA_VERSION + 1))
        assert store.offsets(TOPIC) == {0: 1}
        assert store.sequences(["a"]).lengths.tolist() == [1]
        store.registry.register_model(1, 1.0, {"pv": 1.0}, {}, "m1.pt")
        assert store.registry.latest_model()["version"] == 1
        store.apply(simple(["a"], ["y"], start=1))


def _versions_open(store) -> list[int]:
    return [r[0] for r in store.con.execute(
        "SELECT version FROM schema_version ORDER BY version").fetchall()]


def test_newer_file_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "future.duckdb"
    open_store(path).close()
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version VALUES ($1, 0, 'from the future')",
                [SCHEMA_VERSION + 1])
    con.close()
    for read_only in (False, True):
        with pytest.raises(SchemaVersionError) as info:
            open_store(path, read_only=read_only)
        message = str(info.value)
        assert str(path) in message and f"version {SCHEMA_VERSION + 1}" in message
        assert "upgrade casm-stream" in message
    # Refusing released the file.
    duckdb.connect(str(path)).close()


def test_old_file_opened_read_only_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, path=str(path), target=1)
    con.close()
    with pytest.raises(SchemaVersionError, match="open it once read-write"):
        open_store(path, read_only=True)
    open_store(path).close()
    open_store(path, read_only=True).close()


def test_foreign_duckdb_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "foreign.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE whatever (a INTEGER)")
    con.close()
    with pytest.raises(StoreError, match="not a casm-stream state file"):
        open_store(path)


def test_failed_step_leaves_the_file_at_the_previous_version(tmp_path: Path,
                                                           monkeypatch) -> None:
    import state.schema as schema

    path = tmp_path / "s.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, path=str(path), target=1)
    broken = schema.Migration(2, "broken", (*MIGRATIONS[1].statements, "SELECT * FROM nowhere"))
    monkeypatch.setattr(schema, "MIGRATIONS", (MIGRATIONS[0], broken))
    with pytest.raises(duckdb.Error):
        schema.migrate(con, path=str(path), target=2)
    assert file_version(con) == 1
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert "models" not in tables
    con.close()
