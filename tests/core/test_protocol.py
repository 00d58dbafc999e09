"""The leave-one-out split, the held-out split and the evaluation harness on hand-made logs."""

from __future__ import annotations

import numpy as np
import pytest

from casm_core.protocol import (
    EncodedEvents,
    evaluate,
    heldout_split,
    leave_one_out,
    rank_cases,
    summarize_ranks,
    time_cut_split,
)

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


def scores_of(values: dict[int, float], num_items: int = 20):
    """A scorer giving every user the same scores: `values` by item, 0 elsewhere."""

    def score_all(items: np.ndarray, behaviours: np.ndarray) -> np.ndarray:
        scores = np.zeros((items.shape[0], num_items + 1))
        for item, value in values.items():
            scores[:, item] = value
        return scores

    return score_all


def test_rank_cases_keeps_each_case_and_evaluate_summarizes_them() -> None:
    split = leave_one_out(log_of(ROWS, 4, 20), target=BUY, num_sampled=5, seed=0)
    score_all = scores_of({1: 3.0, 2: 2.0, 6: 1.0})  # two items ahead of the test positive 6
    ranks = rank_cases(score_all, split.test, split.history, width=6, batch_size=1)
    assert ranks.full.tolist() == [2] and ranks.sampled.tolist() == [0]  # 1, 2 are never sampled
    metrics = evaluate(score_all, split.test, split.history, width=6, ks=[1, 5], batch_size=1)
    assert metrics == summarize_ranks(ranks, [1, 5])
    assert metrics["full.hr@1"] == 0.0 and metrics["full.hr@5"] == 1.0 and metrics["users"] == 1.0


def test_full_ranking_can_exclude_every_history_item_but_never_the_positive() -> None:
    # user 0: pv1 buy2 pv6 buy4 pv5 buy6 -> test positive 6 is a re-bought item of the history.
    rows = [(0, 1, PV), (0, 2, BUY), (0, 6, PV), (0, 4, BUY), (0, 5, PV), (0, 6, BUY)]
    split = leave_one_out(log_of(rows, 1, 20), target=BUY, num_sampled=5, seed=0)
    assert split.test.positives.tolist() == [6]
    score_all = scores_of({1: 9.0, 4: 8.0, 5: 7.0, 6: 5.0, 7: 6.0})
    kept = rank_cases(score_all, split.test, split.history, width=2, batch_size=4)
    # width 2: the window is buy4 pv5; item 1 is outside it, yet history, and is excluded too.
    excluded = rank_cases(score_all, split.test, split.history, width=2, batch_size=4, exclude_history=True)
    assert kept.full.tolist() == [4]  # 1, 4, 5, 7 ahead
    assert excluded.full.tolist() == [1]  # only 7 (never seen) is ahead; 6 itself still ranked
    np.testing.assert_array_equal(kept.sampled, excluded.sampled)  # sampled ranking is unchanged
    metrics = evaluate(score_all, split.test, split.history, 2, [1, 2], 4, exclude_history=True)
    assert metrics["full.hr@2"] == 1.0 and metrics["full.hr@1"] == 0.0


def test_history_exclusion_stops_at_each_cases_end() -> None:
    # The validation case (buy4 at position 3) must not exclude items seen after it (pv5).
    split = leave_one_out(log_of(ROWS, 4, 20), target=BUY, num_sampled=5, seed=0)
    score_all = scores_of({5: 9.0, 3: 8.0, 4: 1.0})
    ranks = rank_cases(score_all, split.validation, split.history, width=6, batch_size=8, exclude_history=True)
    assert ranks.full.tolist() == [1]  # 3 is history (excluded), 5 comes later and competes


def timed_log(rows: list[tuple[int, int, int, float]], num_users: int, num_items: int) -> EncodedEvents:
    users, items, behaviours, times = zip(*rows, strict=False)
    return EncodedEvents(
        np.array(users, np.int64), np.array(items, np.int64), np.array(behaviours, np.int64), num_users, num_items,
        timestamps=np.array(times, np.float64),
    )


# Ten events at times 0..9 (quantiles 0.6 -> t 5.4, 0.8 -> t 7.2).
# user 0: pv1@0 buy2@1 pv3@3 buy4@6 pv5@7 buy6@8 buy7@9 -> validation buy4; tests buy6, buy7
# user 1: pv1@2 buy3@4 buy8@5                           -> buy8 at 5 < 5.4: before the cut
TIMED = [
    (0, 1, PV, 0), (0, 2, BUY, 1), (1, 1, PV, 2), (0, 3, PV, 3), (1, 3, BUY, 4),
    (1, 8, BUY, 5), (0, 4, BUY, 6), (0, 5, PV, 7), (0, 6, BUY, 8), (0, 7, BUY, 9),
]


def test_time_cut_split_tests_every_target_event_after_the_cut() -> None:
    split = time_cut_split(timed_log(TIMED, 2, 20), BUY, 0.6, 0.8, num_sampled=4, seed=0)
    assert split.test.users.tolist() == [0, 0]
    assert split.test.positives.tolist() == [6, 7] and split.test.ends.tolist() == [5, 6]
    assert split.validation.users.tolist() == [0] and split.validation.positives.tolist() == [4]
    # Training: only events before the validation cut (t < 5.4), order kept.
    train = split.train
    assert train.items[train.offsets[0] : train.offsets[1]].tolist() == [1, 2, 3]
    assert train.items[train.offsets[1] : train.offsets[2]].tolist() == [1, 3, 8]
    # The second test case's input holds the first test event (causal, after the cut).
    items, _ = split.history.windows(split.test.users, split.test.ends, width=7)
    assert items[1].tolist() == [0, 1, 2, 3, 4, 5, 6]
    for cases in (split.test, split.validation):
        assert (cases.candidates[:, 0] == cases.positives).all()
        assert not np.isin(cases.candidates[:, 1:], [1, 2, 3, 4, 5, 6, 7]).any()


def test_time_cut_split_skips_cases_without_earlier_events_and_needs_timestamps() -> None:
    rows = [(0, 1, PV, 0), (0, 2, PV, 1), (1, 3, BUY, 8), (0, 4, BUY, 9)]
    split = time_cut_split(timed_log(rows, 2, 10), BUY, 0.3, 0.5, num_sampled=2, seed=0)
    assert split.test.users.tolist() == [0]
    assert split.skipped["test target event with fewer than 1 earlier events"] == 1
    with pytest.raises(ValueError, match="timestamps"):
        time_cut_split(log_of(ROWS, 4, 20), BUY, 0.3, 0.5, num_sampled=2, seed=0)
