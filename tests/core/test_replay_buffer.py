"""The trainer's replay buffer: the newest windows by user (least recently updated dropped), a
uniform reservoir over every user seen, and batches mixed at the configured share."""

from __future__ import annotations

import numpy as np
import pytest

from casm_core.replay_buffer import ReplayBuffer


def rows(users: range, width: int = 6, first_item: int = 1) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One window per user whose items all equal the user's number + first_item (so a sampled
    row tells which user it came from)."""
    keys = [f"u{u}" for u in users]
    items = np.repeat(np.asarray(list(users), dtype=np.int64)[:, None] + first_item, width, axis=1)
    return keys, items, np.ones_like(items)


def test_newest_pool_keeps_the_most_recently_updated_users() -> None:
    buffer = ReplayBuffer(width=6, recent_capacity=3, reservoir_capacity=100, seed=0)
    buffer.add(*rows(range(5)))  # u0..u4: the newest three are u2, u3, u4
    buffer.add(*rows(range(1, 2)))  # u1 updated again: now u3, u4, u1
    items, _ = buffer.sample(3, recent_share=1.0)
    assert sorted(items[:, -1].tolist()) == [2, 4, 5]  # u1, u3, u4 (+1)
    assert buffer.sizes == (3, 5)


def test_an_updated_user_keeps_one_row_at_the_newest_window() -> None:
    buffer = ReplayBuffer(width=6, recent_capacity=4, reservoir_capacity=4, seed=0)
    buffer.add(*rows(range(1)))
    keys, items, behaviours = rows(range(1), first_item=40)
    buffer.add(keys, items, behaviours)
    assert buffer.sizes == (1, 1)
    sampled, _ = buffer.sample(2, recent_share=0.5)
    assert set(sampled[:, -1].tolist()) == {40}


def test_reservoir_is_a_uniform_sample_of_every_user_seen() -> None:
    counts = np.zeros(1000)
    for seed in range(60):
        buffer = ReplayBuffer(width=4, recent_capacity=1, reservoir_capacity=100, seed=seed)
        for start in range(0, 1000, 50):  # users arrive over time
            buffer.add(*rows(range(start, start + 50), width=4))
        items, _ = buffer.sample(100, recent_share=0.0)
        counts[items[:, -1] - 1] += 1
    # Each user kept with probability 0.1: early and late users alike.
    assert abs(counts[:500].mean() - counts[500:].mean()) < 1.0
    assert counts.mean() == pytest.approx(6.0)


def test_a_user_fed_again_and_again_is_no_likelier_to_be_kept() -> None:
    kept_active = 0
    for seed in range(200):
        buffer = ReplayBuffer(width=4, recent_capacity=1, reservoir_capacity=10, seed=seed)
        for start in range(0, 100, 10):
            buffer.add(*rows(range(start, start + 10), width=4))
            buffer.add(*rows(range(0, 1), width=4))  # u0 comes back after every group
        kept_active += "u0" in buffer._reservoir.slots
    assert kept_active / 200 == pytest.approx(0.1, abs=0.06)  # 10 of 100 users kept, u0 too


def test_a_seed_fills_only_the_reservoir() -> None:
    buffer = ReplayBuffer(width=4, recent_capacity=5, reservoir_capacity=50, seed=0)
    buffer.add(*rows(range(20), width=4), recent=False)
    assert buffer.sizes == (0, 20)
    buffer.add(*rows(range(30, 32), width=4))
    assert buffer.sizes == (2, 22)


def test_batches_mix_newest_and_reservoir_at_the_share() -> None:
    buffer = ReplayBuffer(width=4, recent_capacity=50, reservoir_capacity=1000, seed=1)
    buffer.add(*rows(range(0, 990), width=4))  # the newest fifty: u940..u989
    items, _ = buffer.sample(100, recent_share=0.3)
    newest = (items[:, -1] - 1 >= 940).sum()
    assert items.shape == (100, 4)
    assert 30 <= newest <= 36  # 30 from the newest pool, a few more from the reservoir (5 % of it)
    small, _ = buffer.sample(200, recent_share=0.5)  # the newest pool holds 50: no row twice from it
    assert (small[:, -1] - 1 >= 940).sum() < 100


def test_rows_without_a_training_position_are_ignored_and_widths_are_fitted() -> None:
    buffer = ReplayBuffer(width=5, recent_capacity=4, reservoir_capacity=4, seed=0)
    items = np.array([[0, 0, 0, 0, 0, 0, 7], [0, 1, 2, 3, 4, 5, 6]])
    buffer.add(["single", "long"], items, np.ones_like(items))
    assert buffer.sizes == (1, 1)
    sampled, _ = buffer.sample(1, recent_share=1.0)
    assert sampled.tolist() == [[2, 3, 4, 5, 6]]  # cut to the newest five
    empty = ReplayBuffer(width=5, recent_capacity=1, reservoir_capacity=1)
    assert empty.sample(4, 0.5)[0].shape == (0, 5)
