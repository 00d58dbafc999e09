"""A partition's state can be exported, dropped and restored in another store."""

from __future__ import annotations

import pytest

from state import PartitionError
from state.partitions import TABLES
from tests.state._synth import TOPIC, SyntheticLog, events, open_store, state_dump


def _log() -> SyntheticLog:
    return SyntheticLog(seed=5, partitions=2, per_partition=600, users=30, items=50,
                        max_poll=25)


def _run(store, log: SyntheticLog, *, only: int | None = None, batches: int | None = None):
    done = 0
    while True:
        offsets = store.all_offsets()
        if only is not None:
            offsets = {**{(TOPIC, p): len(r) for p, r in enumerate(log.records)},
                       **{k: v for k, v in offsets.items() if k == (TOPIC, only)}}
            offsets.setdefault((TOPIC, only), 0)
        batch = log.poll(offsets)
        if batch is None or (batches is not None and done >= batches):
            return
        table, nxt = batch
        store.apply(table, {k: v for k, v in nxt.items() if only is None or k[1] == only})
        done += 1


def _users_of(dump: dict, partition: int) -> dict:
    return {u: v for u, v in dump["users"].items() if v[4] == partition}


def _popularity_of(store, partition: int) -> dict:
    rows = store.con.execute(
        'SELECT i.item_id, sum(count) FROM popularity p JOIN items i ON i.idx = p.item_idx '
        'WHERE "partition" = $1 GROUP BY ALL', [partition]).fetchall()
    return {item: int(n) for item, n in rows}


def test_export_import_moves_a_partition_to_another_store() -> None:
    log = _log()
    with open_store(sequence_length=6) as a, open_store(sequence_length=6) as b:
        _run(a, log, batches=15)
        exported = a.export_partition(TOPIC, 1)
        assert set(exported) == set(TABLES)
        assert exported["meta"].to_pylist()[0]["next_offset"] == a.offsets(TOPIC)[1]
        assert b.import_partition(exported) == len(_users_of(state_dump(a), 1))

        dump_a, dump_b = state_dump(a), state_dump(b)
        assert dump_b["users"] == _users_of(dump_a, 1)
        assert b.all_offsets() == {(TOPIC, 1): a.offsets(TOPIC)[1]}
        assert dump_b["popularity"] == _popularity_of(a, 1)
        assert sorted(e[1:] for e in dump_b["events"]) == sorted(
            e[1:] for e in dump_a["events"] if e[1] == 1)

        # Redelivered records and producer retries are still dropped in the new home.
        held = a.con.execute('SELECT "offset", event_id FROM events WHERE "partition" = 1 '
                             "AND event_id IS NOT NULL ORDER BY seq LIMIT 1").fetchall()[0]
        redelivered = events([{"user_id": "u1", "item_id": "i0", "offset": held[0],
                               "partition": 1}])
        assert b.apply(redelivered).duplicate_offsets == 1
        retry = events([{"user_id": "u1", "item_id": "i0", "partition": 1,
                         "offset": b.offsets(TOPIC)[1], "event_id": held[1]}])
        assert b.check_events(retry).ok

        # Both continue the partition's log and agree on its users.
        _run(a, log)
        _run(b, log, only=1)
        assert state_dump(b)["users"] == _users_of(state_dump(a), 1)
        assert b.apply(retry).duplicate_offsets == 1


def test_retry_of_an_imported_event_id_is_dropped() -> None:
    log = _log()
    with open_store() as a, open_store() as b:
        _run(a, log, batches=5)
        b.import_partition(a.export_partition(TOPIC, 0))
        event_id = a.con.execute('SELECT event_id FROM events WHERE "partition" = 0 '
                                 "AND event_id IS NOT NULL LIMIT 1").fetchall()[0][0]
        retry = events([{"user_id": "u0", "item_id": "i0", "offset": 10_000,
                         "event_id": event_id}])
        assert b.apply(retry).duplicate_event_ids == 1


def test_drop_partition_forgets_its_state_and_import_restores_it() -> None:
    log = _log()
    with open_store(sequence_length=4) as store:
        _run(store, log)
        store.record_published(["u1", "u0"], 1, [["i1"], ["i2"]])
        before = state_dump(store)
        published = store.last_published(["u0", "u1"])
        exported = [store.export_partition(TOPIC, p) for p in (0, 1)]

        dropped = store.drop_partition(TOPIC, 1)
        assert dropped == len(_users_of(before, 1))
        after = state_dump(store)
        assert after["users"] == _users_of(before, 0)
        assert after["offsets"] == {(TOPIC, 0): before["offsets"][(TOPIC, 0)]}
        assert all(e[1] == 0 for e in after["events"])
        assert store.last_published(["u0", "u1"]) == {"u0": published["u0"]}

        with pytest.raises(PartitionError, match="already"):
            store.import_partition(exported[0])
        store.import_partition(exported[1])
        store.import_partition(exported[0], replace=True)
        restored = state_dump(store)
        assert restored["users"] == before["users"]
        assert restored["offsets"] == before["offsets"]
        assert restored["popularity"] == before["popularity"]
        assert restored["items"] == before["items"]
        assert sorted(restored["events"]) == sorted(before["events"])
        assert store.last_published(["u0", "u1"]) == published


def test_import_refuses_users_held_elsewhere_and_unknown_behaviours() -> None:
    log = _log()
    with open_store() as a, open_store() as b, open_store(behaviours=["pv"]) as c:
        _run(a, log, batches=4)
        exported = a.export_partition(TOPIC, 0)
        user = exported["users"].column("user_id")[0].as_py()
        b.apply(events([{"user_id": user, "item_id": "z", "offset": 0, "partition": 7}]))
        with pytest.raises(PartitionError, match="held here on"):
            b.import_partition(exported)
        assert b.stats()["users"] == 1
        with pytest.raises(PartitionError, match="unknown here"):
            c.import_partition(exported)
        with pytest.raises(PartitionError, match="lacks"):
            c.import_partition({"meta": exported["meta"]})
