"""`apply(..., before_width=L)` returns what callers would otherwise read around the apply: the
applied rows, the batch's users with their windows before the batch, each row's dense indices."""

from __future__ import annotations

import numpy as np
import pytest

from tests.state._synth import TOPIC, events, open_store, simple


def _history(store) -> None:
    store.apply(simple(["a", "b", "a"], ["x", "y", "z"]), {(TOPIC, 0): 3})
    store.apply(simple(["c"], ["y"], partition=1), {(TOPIC, 1): 1})


def _batch():
    return events([
        {"user_id": "a", "item_id": "x", "offset": 2, "event_id": "p0-2"},    # redelivered
        {"user_id": "d", "item_id": "new1", "offset": 3, "event_id": "n1", "behavior": "buy"},
        {"user_id": "a", "item_id": "y", "offset": 4, "event_id": "n2", "behavior": "cart"},
        {"user_id": "b", "item_id": "new2", "offset": 5, "event_id": "n1"},   # id repeat
        {"user_id": "c", "item_id": "new2", "offset": 1, "partition": 1, "event_id": "n3"},
        {"user_id": "d", "item_id": "x", "offset": 6},
    ])


@pytest.mark.parametrize("width", [2, 4, 7])
def test_details_equal_the_separate_reads(width: int) -> None:
    with open_store(sequence_length=4) as store, open_store(sequence_length=4) as twin:
        _history(store)
        _history(twin)
        batch = _batch()
        # What callers read before and after applying (on the twin, which applies alike).
        users = list(dict.fromkeys(batch.column("user_id").to_pylist()))
        before = twin.sequences(users, width=width)
        stored = twin.offsets(TOPIC)
        partitions = batch.column("partition").to_numpy()
        offsets = batch.column("offset").to_numpy()
        not_redelivered = offsets >= np.array([stored.get(int(p), 0) for p in partitions])
        twin.apply(batch)
        names = {n: k + 1 for k, n in enumerate(twin.behaviour_names())}

        result = store.apply(batch, before_width=width)
        applied = np.flatnonzero(not_redelivered)
        applied = applied[applied != 3]  # the repeat of event id n1
        np.testing.assert_array_equal(result.rows, applied)
        assert result.rows.dtype == np.int64 and result.applied == applied.size
        assert result.user_ids == users
        np.testing.assert_array_equal(
            np.array(result.user_ids, dtype=object)[result.user_codes],
            np.array(batch.column("user_id").to_pylist(), dtype=object))
        np.testing.assert_array_equal(result.before_items, before.items)
        np.testing.assert_array_equal(result.before_behaviours, before.behaviours)
        assert result.before_items.shape == (len(users), width)
        mask = np.zeros(batch.num_rows, dtype=bool)
        mask[applied] = True
        expected_items = np.where(mask, twin.item_index(batch.column("item_id").to_pylist()), 0)
        expected_behaviours = np.where(
            mask, [names[b] for b in batch.column("behavior").to_pylist()], 0)
        np.testing.assert_array_equal(result.item_idx, expected_items)
        np.testing.assert_array_equal(result.behaviour_idx, expected_behaviours)
        assert result.item_idx.dtype == np.int64 and result.behaviour_idx.dtype == np.int64
        # The windows were read before the batch: the store has moved on since.
        assert not np.array_equal(store.sequences(users, width=width).items, before.items)


def test_details_of_a_batch_with_nothing_to_apply() -> None:
    with open_store() as store:
        _history(store)
        again = simple(["a", "b"], ["x", "y"])
        result = store.apply(again, before_width=3)
        assert result.applied == 0 and result.batch_seq is None
        assert result.rows.tolist() == [] and result.user_ids == ["a", "b"]
        np.testing.assert_array_equal(result.before_items, store.sequences(["a", "b"], width=3).items)
        assert result.item_idx.tolist() == [0, 0] and result.behaviour_idx.tolist() == [0, 0]
        empty = store.apply(events([]), before_width=3)
        assert empty.before_items.shape == (0, 3) and empty.user_codes.shape == (0,)


def test_details_only_when_asked() -> None:
    with open_store() as store:
        result = store.apply(simple(["a"], ["x"]))
        assert result.rows.tolist() == [0]  # always: which rows were applied
        assert result.before_items is None and result.item_idx is None
        with pytest.raises(ValueError):
            store.apply(simple(["a"], ["x"], start=1), before_width=0)
