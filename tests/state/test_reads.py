"""The read side: padded sequences, training samples, vocabularies."""

from __future__ import annotations

import numpy as np
import pytest

from tests.state._synth import open_store, simple


def _store_with_users(count: int, events_per_user: int = 2, **kwargs):
    store = open_store(**kwargs)
    offset = 0
    for k in range(events_per_user):
        users = [f"u{i}" for i in range(count)]
        store.apply(simple(users, [f"i{(i + k) % 7}" for i in range(count)], start=offset))
        offset += count
    return store


def test_width_keeps_the_newest_events_or_pads_more() -> None:
    with open_store(sequence_length=4) as store:
        store.apply(simple(["a"] * 3, ["x", "y", "z"]))
        narrow = store.sequences(["a"], width=2)
        np.testing.assert_array_equal(narrow.items, [[2, 3]])
        assert narrow.lengths.tolist() == [2]
        wide = store.sequences(["a"], width=6)
        np.testing.assert_array_equal(wide.items, [[0, 0, 0, 1, 2, 3]])
        assert wide.lengths.tolist() == [3]
        with pytest.raises(ValueError):
            store.sequences(["a"], width=0)


def test_sequences_of_repeated_and_empty_user_lists() -> None:
    with _store_with_users(3) as store:
        seqs = store.sequences(["u1", "u1", "zz"])
        np.testing.assert_array_equal(seqs.items[0], seqs.items[1])
        assert seqs.user_ids == ["u1", "u1", "zz"]
        empty = store.sequences([])
        assert empty.items.shape == (0, 5) and empty.lengths.shape == (0,)
    with open_store() as store:
        assert store.sequences(["a"]).items.shape == (1, 5)  # nothing applied yet


def test_training_sample_takes_recent_users_first_then_a_uniform_share() -> None:
    with _store_with_users(50) as store:
        # Touch u7, u3, u9 last (u9 the most recent).
        store.apply(simple(["u7", "u3", "u9"], ["a", "b", "c"], start=100))
        sample = store.sample_training_sequences(10, seed=1, recent_fraction=0.3)
        assert sample.user_ids[:3] == ["u9", "u3", "u7"]
        rest = sample.user_ids[3:]
        assert len(rest) == 7 and len(set(sample.user_ids)) == 10
        assert not {"u9", "u3", "u7"} & set(rest)
        again = store.sample_training_sequences(10, seed=1, recent_fraction=0.3)
        assert again.user_ids == sample.user_ids
        np.testing.assert_array_equal(again.items, sample.items)
        other = store.sample_training_sequences(10, seed=2, recent_fraction=0.3)
        assert other.user_ids[:3] == sample.user_ids[:3] and other.user_ids != sample.user_ids
        # The arrays are the users' sequences.
        np.testing.assert_array_equal(sample.items, store.sequences(sample.user_ids).items)


def test_training_sample_draws_the_recent_share_from_a_pool() -> None:
    with _store_with_users(40) as store:
        sample = store.sample_training_sequences(8, seed=3, recent_fraction=0.5,
                                                 recent_users=10)
        recent_pool = {f"u{i}" for i in range(30, 40)}  # the last ten touched
        assert set(sample.user_ids[:4]) <= recent_pool
        order = [int(u[1:]) for u in sample.user_ids[:4]]
        assert order == sorted(order, reverse=True)


def test_training_sample_edge_cases() -> None:
    with _store_with_users(5, recent_fraction=1.0) as store:
        everyone = store.sample_training_sequences(100, seed=0)
        assert sorted(everyone.user_ids) == [f"u{i}" for i in range(5)]
        assert everyone.user_ids == [f"u{i}" for i in range(4, -1, -1)]  # all recent
        uniform = store.sample_training_sequences(5, seed=0, recent_fraction=0.0)
        assert sorted(uniform.user_ids) == sorted(everyone.user_ids)
        assert store.sample_training_sequences(0, seed=0).items.shape == (0, 5)
        assert len(store.sample_training_sequences(5, seed=0, min_length=3)) == 0
        with pytest.raises(ValueError):
            store.sample_training_sequences(3, seed=0, recent_fraction=1.5)
        with pytest.raises(ValueError):
            store.sample_training_sequences(-1, seed=0)


def test_training_sample_respects_min_length() -> None:
    with _store_with_users(6, events_per_user=1) as store:
        store.apply(simple(["u2", "u4"], ["a", "b"], start=50))
        sample = store.sample_training_sequences(10, seed=0, min_length=2)
        assert sorted(sample.user_ids) == ["u2", "u4"]
        assert (sample.lengths >= 2).all()


def test_stats_and_partitions() -> None:
    with _store_with_users(4) as store:
        stats = store.stats()
        assert stats["users"] == 4 and stats["events_held"] == 8
        assert stats["events_applied"] == 8 and stats["batches"] == 2
        assert store.partitions() == [("behaviours", 0)]
        assert store.user_ids() == ["u0", "u1", "u2", "u3"]
