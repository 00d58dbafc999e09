"""`StateStore.apply`: rolling sequences, vocabularies, offsets, duplicates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from state import ApplyResult
from tests.state._synth import T0, TOPIC, events, open_store, simple, state_dump


def test_apply_builds_left_padded_sequences_newest_last() -> None:
    with open_store(sequence_length=4) as store:
        result = store.apply(simple(["a", "b", "a", "a"], ["x", "y", "z", "x"],
                                    behaviours=["pv", "buy", "cart", "pv"]))
        assert isinstance(result, ApplyResult)
        assert (result.applied, result.duplicates, result.new_items) == (4, 0, 3)
        assert result.touched_users == ["a", "b"]
        assert result.offsets == {(TOPIC, 0): 4}
        seqs = store.sequences(["a", "b", "nobody"])
        assert seqs.items.dtype == np.int64 and seqs.items.shape == (3, 4)
        np.testing.assert_array_equal(seqs.items, [[0, 1, 3, 1], [0, 0, 0, 2], [0, 0, 0, 0]])
        np.testing.assert_array_equal(seqs.behaviours,
                                      [[0, 1, 2, 1], [0, 0, 0, 4], [0, 0, 0, 0]])
        np.testing.assert_array_equal(seqs.lengths, [3, 1, 0])
        np.testing.assert_array_equal(seqs.n_events, [3, 1, 0])
        np.testing.assert_array_equal(seqs.last_offset, [3, 1, -1])
        np.testing.assert_array_equal(seqs.last_partition, [0, 0, -1])
        np.testing.assert_array_equal(seqs.last_timestamp[:2], [T0 + 3, T0 + 1])
        assert np.isnan(seqs.last_timestamp[2])
        np.testing.assert_array_equal(seqs.last_produced_ms[:2], [(T0 + 3) * 1000,
                                                                  (T0 + 1) * 1000])
        assert seqs.last_topic == [TOPIC, TOPIC, None]
        assert seqs["items"] is seqs.items and "lengths" in seqs.keys()
        assert store.item_ids() == ["x", "y", "z"]
        assert store.behaviour_names() == ["pv", "cart", "fav", "buy"]


def test_sequence_keeps_the_last_n_events_across_batches() -> None:
    with open_store(sequence_length=3) as store:
        for k in range(5):
            store.apply(simple(["a", "a"], [f"i{2 * k}", f"i{2 * k + 1}"], start=2 * k))
        seqs = store.sequences(["a"])
        assert [store.item_ids()[i - 1] for i in seqs.items[0]] == ["i7", "i8", "i9"]
        assert seqs.n_events[0] == 10 and seqs.lengths[0] == 3


def test_order_is_arrival_order_not_event_time() -> None:
    with open_store() as store:
        table = events([
            {"user_id": "a", "item_id": "late", "offset": 0, "timestamp": T0 + 100},
            {"user_id": "a", "item_id": "early", "offset": 1, "timestamp": T0 + 1},
        ])
        store.apply(table)
        assert [store.item_ids()[i - 1] for i in store.sequences(["a"]).items[0][-2:]] == [
            "late", "early"]
        assert store.sequences(["a"]).last_timestamp[0] == T0 + 1


def test_item_indices_follow_first_appearance_and_are_deterministic() -> None:
    batches = [simple(["u", "v", "w"], ["c", "a", "c"]),
               simple(["u", "v"], ["b", "a"], start=3)]
    dumps = []
    for _ in range(2):
        with open_store() as store:
            results = [store.apply(b) for b in batches]
            assert [r.new_items for r in results] == [2, 1]
            assert store.item_ids() == ["c", "a", "b"]
            dumps.append(state_dump(store))
    assert dumps[0] == dumps[1]


def test_same_batch_twice_changes_nothing_the_second_time() -> None:
    with open_store() as store:
        batch = simple(["a", "b", "a"], ["x", "y", "z"])
        store.apply(batch, {(TOPIC, 0): 10})
        before = state_dump(store)
        stats = store.stats()
        again = store.apply(batch, {(TOPIC, 0): 10})
        assert (again.applied, again.duplicate_offsets, again.batch_seq) == (0, 3, None)
        assert again.touched_users == [] and again.new_items == 0
        assert state_dump(store) == before
        assert store.stats() == stats


def test_offsets_recorded_for_an_empty_batch_and_past_the_last_event() -> None:
    with open_store() as store:
        result = store.apply(events([]), {(TOPIC, 0): 7, (TOPIC, 3): 2})
        assert result.applied == 0 and result.batch_seq == 1
        assert store.offsets(TOPIC) == {0: 7, 3: 2}
        # Events at offsets below the stored ones were applied already (dead letters here).
        dropped = store.apply(simple(["a"], ["x"], start=6))
        assert dropped.duplicate_offsets == 1 and dropped.applied == 0
        applied = store.apply(simple(["a"], ["x"], start=7), {(TOPIC, 0): 12})
        assert applied.applied == 1 and store.offsets(TOPIC) == {0: 12, 3: 2}
        assert store.offsets("other") == {}


def test_offsets_never_move_backwards() -> None:
    with open_store() as store:
        store.apply(simple(["a", "b"], ["x", "y"]), {(TOPIC, 0): 5})
        result = store.apply(events([]), {(TOPIC, 0): 3})
        assert result.batch_seq is None and store.offsets(TOPIC) == {0: 5}


def test_missing_partition_in_offsets_is_inferred_from_the_events() -> None:
    with open_store() as store:
        store.apply(simple(["a", "b"], ["x", "y"], start=40, partition=2), {})
        assert store.offsets(TOPIC) == {2: 42}


def test_redelivery_below_the_stored_offset_is_dropped_even_without_event_id() -> None:
    with open_store() as store:
        store.apply(simple(["a", "b", "c"], ["x", "y", "z"], ids=False))
        before = state_dump(store)
        partly = simple(["b", "c", "d"], ["y", "z", "w"], start=1, ids=False)
        result = store.apply(partly)
        assert (result.applied, result.duplicate_offsets) == (1, 2)
        assert result.touched_users == ["d"]
        assert store.sequences(["b"]).n_events[0] == before["users"]["b"][2]
        assert store.offsets(TOPIC) == {0: 4}


def test_event_id_retries_are_dropped_within_a_batch_and_across_batches() -> None:
    with open_store() as store:
        first = events([
            {"user_id": "a", "item_id": "x", "offset": 0, "event_id": "e1"},
            {"user_id": "a", "item_id": "x", "offset": 1, "event_id": "e1"},  # retry
            {"user_id": "b", "item_id": "y", "offset": 2},  # no id
        ])
        r1 = store.apply(first)
        assert (r1.applied, r1.duplicate_event_ids) == (2, 1)
        second = events([
            {"user_id": "a", "item_id": "x", "offset": 0, "event_id": "e1", "partition": 1},
            {"user_id": "b", "item_id": "y", "offset": 3},  # same content, no id: applied
        ])
        r2 = store.apply(second)
        assert (r2.applied, r2.duplicate_event_ids, r2.duplicate_offsets) == (1, 1, 0)
        assert store.sequences(["a", "b"]).n_events.tolist() == [1, 2]
        # The retry's offset still advances its partition.
        assert store.offsets(TOPIC) == {0: 4, 1: 1}


def test_produced_ms_and_event_id_columns_are_optional() -> None:
    with open_store() as store:
        table = simple(["a"], ["x"]).drop_columns(["produced_ms", "event_id"])
        assert store.apply(table).applied == 1
        seqs = store.sequences(["a"])
        assert seqs.last_produced_ms[0] == -1
        assert store.con.execute("SELECT produced_ms, event_id FROM events").fetchall() == [
            (None, None)]


def test_compatible_column_types_are_cast() -> None:
    with open_store() as store:
        table = simple(["a"], ["x"])
        table = table.set_column(table.schema.get_field_index("partition"), "partition",
                                 pa.array([0], pa.int64()))
        table = table.set_column(table.schema.get_field_index("user_id"), "user_id",
                                 pa.array(["a"], pa.large_string()))
        assert store.apply(table).applied == 1


def test_open_vocabulary_appends_behaviours() -> None:
    with open_store(open_vocabulary=True) as store:
        result = store.apply(simple(["a", "b"], ["x", "y"], behaviours=["share", "pv"]))
        assert result.new_behaviours == ["share"]
        assert store.behaviour_names() == ["pv", "cart", "fav", "buy", "share"]
        assert store.sequences(["a"]).behaviours[0, -1] == 5
        np.testing.assert_array_equal(store.item_popularity(["share"]), [0, 1, 0])


def test_multiple_topics_and_partitions_are_tracked_separately() -> None:
    with open_store() as store:
        table = pa.concat_tables([
            events([{"user_id": "a", "item_id": "x", "offset": 5}], topic="t1"),
            events([{"user_id": "b", "item_id": "x", "offset": 5, "partition": 1}], topic="t2"),
        ])
        store.apply(table)
        assert store.offsets("t1") == {0: 6} and store.offsets("t2") == {1: 6}
        seqs = store.sequences(["a", "b"])
        assert seqs.last_topic == ["t1", "t2"] and seqs.last_partition.tolist() == [0, 1]


def test_popularity_is_counted_per_behaviour() -> None:
    with open_store() as store:
        store.apply(simple(["a", "b", "c", "a"], ["x", "x", "y", "x"],
                           behaviours=["pv", "buy", "buy", "pv"]))
        np.testing.assert_array_equal(store.item_popularity(), [0, 3, 1])
        np.testing.assert_array_equal(store.item_popularity(["buy"]), [0, 1, 1])
        np.testing.assert_array_equal(store.item_popularity(["pv", "cart"]), [0, 2, 0])
        with pytest.raises(ValueError, match="unknown behaviour"):
            store.item_popularity(["nope"])
        assert store.num_items() == 2 and store.num_users() == 3
        np.testing.assert_array_equal(store.item_index(["y", "x", "new"]), [2, 1, 0])


def test_failed_write_rolls_back_everything_and_the_store_keeps_working(monkeypatch) -> None:
    import state.events as store_module
    from state import StoreError

    with open_store() as store:
        store.apply(simple(["a"], ["x"]))
        before, stats = state_dump(store), store.stats()
        # Items are inserted before the events in the same transaction; break the events.
        monkeypatch.setattr(store_module, "_EVENT_COLUMNS", "seq, no_such_column")
        with pytest.raises(StoreError, match="failed"):
            store.apply(simple(["b"], ["new-item"], start=1))
        assert state_dump(store) == before and store.stats() == stats
        assert store.con.execute("SELECT count(*) FROM items").fetchall()[0][0] == 1
        monkeypatch.undo()
        result = store.apply(simple(["b"], ["new-item"], start=1))
        assert result.applied == 1 and store.item_ids() == ["x", "new-item"]
