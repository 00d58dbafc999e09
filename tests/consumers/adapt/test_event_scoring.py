"""Test-then-train ranks: each event is ranked after exactly the events its user had before it."""

from __future__ import annotations

import numpy as np
import torch

from casm_core.config import ModelConfig
from casm_core.metrics import rank_in_full
from casm_core.model import CASM
from casm_core.scoring import Scorer
from consumers.adapt.event_scoring import NO_RANK, score_events

NUM_ITEMS = 30


def scorer() -> Scorer:
    torch.manual_seed(0)
    model = CASM(ModelConfig(hidden_dim=16, context_dim=8, ffn_dim=16, max_len=6, dropout=0.0), NUM_ITEMS, 3)
    return Scorer(model, target_behaviour=3)


def test_ranks_use_stored_history_plus_earlier_events_of_the_batch() -> None:
    s = scorer()
    # Two users; user 0 has stored events [3, 4], user 1 none.
    stored_items = np.array([[0, 0, 0, 0, 3, 4], [0, 0, 0, 0, 0, 0]])
    stored_behaviours = np.array([[0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 0, 0]])
    # Batch: u0 item 5, u1 item 6, u0 item 7, u1 item 99 (unknown to the model), u0 item 8
    user_codes = np.array([0, 1, 0, 1, 0])
    item_codes = np.array([5, 6, 7, 0, 8])
    behaviour_codes = np.array([1, 1, 3, 1, 1])
    result = score_events(
        s, np.arange(5), stored_items, stored_behaviours, user_codes, item_codes, behaviour_codes,
        num_sampled=10, rng=np.random.default_rng(0), chunk=2,
    )
    assert result.cold.tolist() == [False, True, False, False, False]
    assert result.rank_full[1] == NO_RANK and result.rank_full[3] == NO_RANK  # cold / unknown item
    expected_inputs = {
        0: ([0, 0, 0, 0, 3, 4], [0, 0, 0, 0, 1, 2]),
        2: ([0, 0, 0, 3, 4, 5], [0, 0, 0, 1, 2, 1]),
        4: ([0, 0, 3, 4, 5, 7], [0, 0, 1, 2, 1, 3]),
    }
    for row, (items, behaviours) in expected_inputs.items():
        scores = s.score_all(np.array([items]), np.array([behaviours])).numpy()
        assert result.rank_full[row] == rank_in_full(scores, np.array([item_codes[row]]))[0], row
        assert 0 <= result.rank_sampled[row] <= 10


def test_a_user_with_more_events_than_the_window_sees_the_last_window() -> None:
    s = scorer()
    # 9 batch events of one user (window 6): every event sees exactly the 6 events before it.
    item_codes = np.arange(1, 10)
    result = score_events(
        s, np.arange(9), np.zeros((1, 6), np.int64), np.zeros((1, 6), np.int64), np.zeros(9, np.int64),
        item_codes, np.ones(9, np.int64), num_sampled=5, rng=np.random.default_rng(2), chunk=3,
    )
    assert result.cold.tolist() == [True] + [False] * 8
    for row in range(1, 9):
        before = item_codes[max(0, row - 6) : row]
        items = np.concatenate([np.zeros(6 - before.size, np.int64), before])[None, :]
        scores = s.score_all(items, (items > 0).astype(np.int64)).numpy()
        assert result.rank_full[row] == rank_in_full(scores, np.array([item_codes[row]]))[0], row


def test_only_requested_rows_are_scored() -> None:
    s = scorer()
    result = score_events(
        s, np.array([1]), np.zeros((1, 6), np.int64), np.zeros((1, 6), np.int64), np.array([0, 0]),
        np.array([2, 3]), np.array([1, 3]), num_sampled=5, rng=np.random.default_rng(1), chunk=8,
    )
    assert result.rows.tolist() == [1] and not result.cold[0]
    assert result.rank_full[0] >= 0
