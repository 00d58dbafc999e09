"""The trainer's start-up sample policy over the state store: recent users first, then a uniform
share (`consumers.training.sampling`)."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.training.sampling import sample_training_sequences
from tests.state._synth import simple, store_with_users


def test_training_sample_takes_recent_users_first_then_a_uniform_share() -> None:
    with store_with_users(50) as store:
        # Touch u7, u3, u9 last (u9 the most recent).
        store.apply(simple(["u7", "u3", "u9"], ["a", "b", "c"], start=100))
        sample = sample_training_sequences(store, 10, seed=1, recent_fraction=0.3)
        assert sample.user_ids[:3] == ["u9", "u3", "u7"]
        rest = sample.user_ids[3:]
        assert len(rest) == 7 and len(set(sample.user_ids)) == 10
        assert not {"u9", "u3", "u7"} & set(rest)
        again = sample_training_sequences(store, 10, seed=1, recent_fraction=0.3)
        assert again.user_ids == sample.user_ids
        np.testing.assert_array_equal(again.items, sample.items)
        other = sample_training_sequences(store, 10, seed=2, recent_fraction=0.3)
        assert other.user_ids[:3] == sample.user_ids[:3] and other.user_ids != sample.user_ids
        # The arrays are the users' sequences.
        np.testing.assert_array_equal(sample.items, store.sequences(sample.user_ids).items)


def test_training_sample_draws_the_recent_share_from_a_pool() -> None:
    with store_with_users(40) as store:
        sample = sample_training_sequences(store, 8, seed=3, recent_fraction=0.5,
                                                 recent_users=10)
        recent_pool = {f"u{i}" for i in range(30, 40)}  # the last ten touched
        assert set(sample.user_ids[:4]) <= recent_pool
        order = [int(u[1:]) for u in sample.user_ids[:4]]
        assert order == sorted(order, reverse=True)


def test_training_sample_edge_cases() -> None:
    with store_with_users(5) as store:
        everyone = sample_training_sequences(store, 100, seed=0, recent_fraction=1.0)
        assert sorted(everyone.user_ids) == [f"u{i}" for i in range(5)]
        assert everyone.user_ids == [f"u{i}" for i in range(4, -1, -1)]  # all recent
        uniform = sample_training_sequences(store, 5, seed=0, recent_fraction=0.0)
        assert sorted(uniform.user_ids) == sorted(everyone.user_ids)
        assert sample_training_sequences(store, 0, seed=0, recent_fraction=1.0).items.shape == (0, 5)
        assert len(sample_training_sequences(store, 5, seed=0, recent_fraction=1.0, min_length=3)) == 0
        with pytest.raises(ValueError):
            sample_training_sequences(store, 3, seed=0, recent_fraction=1.5)
        with pytest.raises(ValueError):
            sample_training_sequences(store, -1, seed=0, recent_fraction=1.0)


def test_training_sample_respects_min_length() -> None:
    with store_with_users(6, events_per_user=1) as store:
        store.apply(simple(["u2", "u4"], ["a", "b"], start=50))
        sample = sample_training_sequences(store, 10, seed=0, recent_fraction=0.8, min_length=2)
        assert sorted(sample.user_ids) == ["u2", "u4"]
        assert (sample.lengths >= 2).all()
