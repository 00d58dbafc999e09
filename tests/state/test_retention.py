"""Retention trims events only; the event-id memory outlives trimming until its window ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.state._synth import NOW, T0, TOPIC, SyntheticLog, events, open_store, simple, state_dump


def _without_events(dump: dict) -> dict:
    return {k: v for k, v in dump.items() if k != "events"}


def _ten(store, ids: bool = True) -> None:
    store.apply(simple([f"u{k % 3}" for k in range(10)], [f"i{k % 4}" for k in range(10)],
                       ids=ids), {(TOPIC, 0): 10})


def test_trim_by_rows_keeps_the_newest_and_touches_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path, fold_events=1_000) as store:
        _ten(store)
        before = state_dump(store)
        assert store.retention.trim(max_rows=4) == 6
        after = state_dump(store)
        assert _without_events(after) == _without_events(before)
        assert [e[2] for e in after["events"]] == [6, 7, 8, 9]
        assert store.retention.trim(max_rows=4) == 0
    with open_store(path) as store:  # the trimmed events were folded first
        assert _without_events(state_dump(store)) == _without_events(before)


def test_trim_by_age_uses_the_newest_event_time_or_now() -> None:
    with open_store() as store:
        _ten(store)  # event times T0 + 0 .. T0 + 9
        assert store.retention.trim(max_age_s=3.0) == 6  # older than T0 + 9 - 3
        assert store.retention.trim(max_age_s=1.0, now=T0 + 100) == 4
        assert store.stats()["events_held"] == 0
        assert store.retention.trim(max_age_s=1.0) == 0  # nothing left, no reference time
        assert store.sequences(["u0"]).n_events.tolist() == [4]


def test_trim_with_both_limits_removes_either() -> None:
    with open_store() as store:
        _ten(store)
        assert store.retention.trim(max_age_s=7.5, max_rows=5) == 5  # rows win: 5 left
        assert store.retention.trim(max_age_s=1.5, max_rows=5) == 3  # age wins: T0+8, T0+9 left
        with pytest.raises(ValueError):
            store.retention.trim(max_age_s=-1)


def test_event_ids_of_trimmed_events_are_still_dropped_until_the_window_ends() -> None:
    now = [NOW]
    with open_store(clock=lambda: now[0], event_id_window_s=3_600.0) as store:
        _ten(store)
        assert store.retention.trim(max_rows=0) == 10
        retry = events([{"user_id": "u0", "item_id": "i0", "offset": 10, "event_id": "p0-3"}])
        result = store.apply(retry)
        assert (result.applied, result.duplicate_event_ids) == (0, 1)
        assert store.con.execute("SELECT count(*) FROM event_ids").fetchall()[0][0] == 10
        now[0] += 3_601.0
        store.retention.retain()  # no event retention configured: only forgets old ids
        assert store.con.execute("SELECT count(*) FROM event_ids").fetchall()[0][0] == 0
        late = events([{"user_id": "u0", "item_id": "i0", "offset": 11, "event_id": "p0-4"}])
        assert store.apply(late).applied == 1


def test_id_memory_survives_reopen_after_trim(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path) as store:
        _ten(store)
        store.retention.trim(max_rows=2)
    with open_store(path) as store:
        retry = events([{"user_id": "u0", "item_id": "i0", "offset": 10, "event_id": "p0-0"}])
        assert store.apply(retry).duplicate_event_ids == 1


def test_retain_applies_the_configured_retention() -> None:
    with open_store(retention_rows=3) as store:
        _ten(store)
        assert store.retention.retain() == 7
    with open_store(retention_s=2.0) as store:
        _ten(store)
        assert store.retention.retain() == 7  # older than T0 + 9 - 2


def test_compact_shrinks_the_file_and_keeps_the_state(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    log = SyntheticLog(seed=3, partitions=2, per_partition=20_000, users=100, items=300,
                       max_poll=2_000)
    with open_store(path, fold_events=5_000) as store:
        while (batch := log.poll(store.all_offsets())) is not None:
            store.apply(*batch)
        store.retention.trim(max_rows=100)
        before = state_dump(store)
        sizes = store.retention.compact()
        assert sizes["bytes_after"] < sizes["bytes_before"]
        assert state_dump(store) == before
        store.apply(events([{"user_id": "new", "item_id": "i1", "offset": 20_000}]))
        expected = state_dump(store)
    assert not Path(str(path) + ".compact").exists()
    with open_store(path) as store:
        assert state_dump(store) == expected
    with open_store() as memory:
        memory.apply(simple(["a"], ["x"]))
        assert memory.retention.compact() == {"bytes_before": 0, "bytes_after": 0}
