"""The file is the truth: reopening rebuilds the same state, folds included or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from state import (
    ConfigMismatchError,
    ReadOnlyStoreError,
    StateStore,
    StoreClosedError,
    StoreConfig,
)
from tests.state._synth import (
    BEHAVIOURS,
    TOPIC,
    SyntheticLog,
    clock,
    open_store,
    simple,
    state_dump,
)


def _apply_log(store: StateStore, log: SyntheticLog, batches: int | None = None) -> None:
    done = 0
    while (batch := log.poll(store.all_offsets())) is not None:
        store.apply(*batch)
        done += 1
        if batches is not None and done >= batches:
            return


@pytest.mark.parametrize("fold_events", [1, 50, 10_000])
def test_reopen_rebuilds_the_same_state(tmp_path: Path, fold_events: int) -> None:
    log = SyntheticLog(seed=1, per_partition=300, users=40, items=60)
    path = tmp_path / "s.duckdb"
    store = open_store(path, fold_events=fold_events, sequence_length=6)
    _apply_log(store, log, batches=12)
    before = state_dump(store)
    store.db.close()  # as if the process died: nothing folded on the way out
    with open_store(path, fold_events=fold_events, sequence_length=6) as reopened:
        assert state_dump(reopened) == before
        _apply_log(reopened, log)
        after = state_dump(reopened)
    with open_store(path, sequence_length=6) as final:
        assert state_dump(final) == after
        assert final.stats()["events_not_folded"] == 0  # close folds
    with open_store(sequence_length=6) as memory:
        _apply_log(memory, log)
        assert state_dump(memory) == after


def test_automatic_folds_bound_the_replay(tmp_path: Path) -> None:
    log = SyntheticLog(seed=2, per_partition=200, users=30, items=40)
    with open_store(tmp_path / "s.duckdb", fold_events=100) as store:
        _apply_log(store, log)
        stats = store.stats()
        assert stats["events_not_folded"] < 100 + log.max_poll * log.partitions
        snapshot = store.con.execute("SELECT count(*) FROM users").fetchall()[0][0]
        assert snapshot > 0
        assert store.fold() >= 0
        assert store.stats()["events_not_folded"] == 0
        assert store.fold() == 0  # nothing left to fold


def test_sequence_length_may_change_between_opens(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path, sequence_length=4) as store:
        store.apply(_many("a", 6))
        assert store.sequences(["a"]).lengths.tolist() == [4]
    with open_store(path, sequence_length=2) as store:
        seqs = store.sequences(["a"])
        assert seqs.lengths.tolist() == [2]
        assert [store.item_ids()[i - 1] for i in seqs.items[0]] == ["i4", "i5"]
    with open_store(path, sequence_length=8) as store:
        # Users not touched while N was 2 keep their 4 events in the snapshot...
        assert store.sequences(["a"]).lengths.tolist() == [4]
    with open_store(path, sequence_length=2) as store:
        store.apply(simple(["a"], ["i6"], start=6))
    with open_store(path, sequence_length=8) as store:
        # ...a user touched then keeps 2: longer history is not recovered.
        seqs = store.sequences(["a"])
        assert seqs.lengths.tolist() == [2] and seqs.n_events.tolist() == [7]
        assert [store.item_ids()[i - 1] for i in seqs.items[0, -2:]] == ["i5", "i6"]


def _many(user: str, count: int):
    return simple([user] * count, [f"i{k}" for k in range(count)])


def test_behaviour_vocabulary_must_stay_in_order(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    open_store(path, behaviours=["pv", "buy"]).close()
    with open_store(path, behaviours=["pv", "buy", "cart"]) as store:  # appending is fine
        assert store.behaviour_names() == ["pv", "buy", "cart"]
    with open_store(path, behaviours=["pv"]) as store:  # a prefix is fine, the file wins
        assert store.behaviour_names() == ["pv", "buy", "cart"]
    with pytest.raises(ConfigMismatchError, match="numbers behaviours"):
        open_store(path, behaviours=["buy", "pv"])
    with pytest.raises(ValueError, match="unique"):
        open_store(path, behaviours=["pv", "pv"])


def test_from_config(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "deep" / "dir" / "s.duckdb", sequence_length=7,
                      fold_events=3, retention_days=2.0, threads=1, memory_limit="512MB")
    with StateStore.from_config(cfg, behaviours=BEHAVIOURS, clock=clock) as store:
        assert store.sequence_length == 7 and store.events.fold_events == 3
        assert store.retention.retention_s == 2 * 86_400.0
        assert store.con.execute("SELECT current_setting('threads')").fetchall()[0][0] == 1
    assert cfg.path.exists()


def test_closed_and_read_only_stores_refuse_work(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    store = open_store(path)
    store.apply(_many("a", 2), {(TOPIC, 0): 2})
    store.close()
    store.close()  # idempotent
    assert store.closed
    with pytest.raises(StoreClosedError):
        store.sequences(["a"])
    with pytest.raises(StoreClosedError):
        store.apply(_many("a", 1))
    with open_store(path, read_only=True) as ro:
        assert ro.offsets(TOPIC) == {0: 2}
        np.testing.assert_array_equal(ro.sequences(["a"]).lengths, [2])
        for write in (lambda: ro.apply(_many("b", 1)), ro.fold, ro.retention.compact,
                      lambda: ro.retention.trim(max_rows=1),
                      lambda: ro.registry.record_alpha(1.0, {"pv": 1.0}, "x")):
            with pytest.raises(ReadOnlyStoreError):
                write()


def test_read_only_open_of_a_missing_file_fails_clearly(tmp_path: Path) -> None:
    from state import StoreError
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing.duckdb", read_only=True)
