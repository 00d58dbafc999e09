"""The leave-one-out split, the held-out split and the evaluation harness on hand-made logs."""

from __future__ import annotations

import numpy as np
import pytest

from casm_core.protocol import EncodedEvents, evaluate, heldout_split, leave_one_out

PV, BUY = 1, 2


def log_of(rows: list[tuple[int, int, int]], num_users: int, num_items: int) -> EncodedEvents:
    users, items, behaviours = (np.array(column, dtype=np.int64) for column in zip(*rows, strict=False))
    return EncodedEvents(users, items, behaviours, num_users, num_items)


# user 0: pv1 buy2 pv3 buy4 pv5 buy6 pv7   -> val = buy4 (pos 3), test = buy6 (pos 5), pv7 after test
# user 1: pv1 buy2                           -> one target event: skipped, trains on everything
# user 2: buy3 buy5                          -> no event before validation: skipped
# user 3: pv8                                -> no target event
ROWS = [
    (0, 1, PV), (1, 1, PV), (0, 2, BUY), (2, 3, BUY), (0, 3, PV), (1, 2, BUY), (0, 4, BUY),
    (3, 8, PV), (0, 5, PV), (2, 5, BUY), (0, 6, BUY), (0, 7, PV),
]


def test_leave_one_out_uses_last_two_target_events_and_never_trains_on_them() -> None:
    split = leave_one_out(log_of(ROWS, 4, 20), target=BUY, num_sampled=5, seed=0)
    assert split.test.users.tolist() == [0] and split.validation.users.tolist() == [0]
    assert split.test.positives.tolist() == [6] and split.validation.positives.tolist() == [4]
    assert split.validation.ends.tolist() == [3] and split.test.ends.tolist() == [5]
    # Training: user 0 stops before the validation buy; the others keep all their events.
    train = split.train
    assert train.items[train.offsets[0] : train.offsets[1]].tolist() == [1, 2, 3]
    assert train.items[train.offsets[1] : train.offsets[2]].tolist() == [1, 2]
    assert train.items[train.offsets[2] : train.offsets[3]].tolist() == [3, 5]
    assert train.items[train.offsets[3] : train.offsets[4]].tolist() == [8]
    assert split.skipped == {
        "no target event": 1,
        "one target event": 1,
        "fewer than 1 events before validation": 1,
    }
    # Test input: everything before the test buy, the validation buy included.
    items, behaviours = split.history.windows(split.test.users, split.test.ends, width=6)
    assert items.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert behaviours.tolist() == [[0, PV, BUY, PV, BUY, PV]]


def test_sampled_candidates_are_fixed_by_seed_and_never_interacted() -> None:
    events = log_of(ROWS, 4, 20)
    a = leave_one_out(events, target=BUY, num_sampled=10, seed=7)
    b = leave_one_out(events, target=BUY, num_sampled=10, seed=7)
    np.testing.assert_array_equal(a.test.candidates, b.test.candidates)
    candidates = a.test.candidates[0]
    assert candidates[0] == 6
    assert not np.isin(candidates[1:], [1, 2, 3, 4, 5, 6, 7]).any()  # pv7 after the test counts too
    assert not np.array_equal(a.validation.candidates[0, 1:], a.test.candidates[0, 1:])


def test_min_train_events_skips_short_histories() -> None:
    split = leave_one_out(log_of(ROWS, 4, 20), target=BUY, num_sampled=3, seed=0, min_train_events=4)
    assert len(split.test) == 0
    assert split.skipped["fewer than 4 events before validation"] == 2


def test_heldout_split_tests_after_the_whole_sequence() -> None:
    events = log_of(ROWS, 4, 20)
    split = heldout_split(events, np.array([0, 3]), np.array([9, 10]), num_sampled=4, seed=1)
    assert split.test.users.tolist() == [0]  # user 3 has no event before its only (validation) event
    assert split.test.positives.tolist() == [9]
    assert split.test.ends.tolist() == [7]
    assert split.validation.positives.tolist() == [7] and split.validation.ends.tolist() == [6]
    assert not np.isin(split.validation.candidates[0, 1:], [9]).any()
    assert split.skipped["fewer than 1 events before validation"] == 1


def test_evaluate_with_a_perfect_and_a_hopeless_scorer() -> None:
    split = leave_one_out(log_of(ROWS, 4, 20), target=BUY, num_sampled=5, seed=0)

    def oracle(items: np.ndarray, behaviours: np.ndarray) -> np.ndarray:
        scores = np.zeros((items.shape[0], 21))
        scores[:, 6] = 1.0  # the test positive of user 0
        return scores

    def hopeless(items: np.ndarray, behaviours: np.ndarray) -> np.ndarray:
        scores = np.ones((items.shape[0], 21))
        scores[:, 6] = -1.0
        return scores

    best = evaluate(oracle, split.test, split.history, width=6, ks=[1, 5], batch_size=2)
    assert best["sampled.hr@1"] == 1.0 and best["full.hr@1"] == 1.0 and best["users"] == 1.0
    worst = evaluate(hopeless, split.test, split.history, width=6, ks=[5], batch_size=2)
    assert worst["sampled.hr@5"] == 0.0 and worst["full.ndcg@5"] == 0.0
    assert worst["sampled.mrr"] == pytest.approx(1 / 6)
