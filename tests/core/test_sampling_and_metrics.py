"""Batch building, negative sampling, vocabulary and metrics on hand-made cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from casm_core.baselines import MostPopular
from casm_core.metrics import case_values, hit_rate, mrr, ndcg, rank_among, rank_in_full, summarize
from casm_core.sampling import NegativeSampler, SequenceCorpus, padded_item_keys, training_batch
from casm_core.scoring import top_k_of_scores
from casm_core.vocab import Vocabulary


def corpus() -> SequenceCorpus:
    # user 0: items 1 2 3 4 ; user 1: 5 ; user 2: 6 7
    users = np.array([0, 1, 0, 2, 0, 2, 0])
    items = np.array([1, 5, 2, 6, 3, 7, 4])
    behaviours = np.array([1, 1, 2, 1, 3, 2, 1])
    return SequenceCorpus.from_events(users, items, behaviours, num_users=3)


def test_corpus_groups_events_by_user_in_order() -> None:
    c = corpus()
    assert c.offsets.tolist() == [0, 4, 5, 7]
    assert c.items.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert c.behaviours.tolist() == [1, 2, 3, 1, 1, 1, 2]


def test_windows_are_left_padded_and_end_where_asked() -> None:
    items, behaviours = corpus().windows(np.array([0, 2, 0]), np.array([3, 2, 4]), width=3)
    assert items.tolist() == [[1, 2, 3], [0, 6, 7], [2, 3, 4]]
    assert behaviours.tolist() == [[1, 2, 3], [0, 1, 2], [2, 3, 1]]


def test_item_keys_and_padded_keys_agree() -> None:
    c = corpus()
    keys = c.item_keys(np.array([2, 0]), stride=10)
    assert keys.tolist() == [6, 7, 11, 12, 13, 14]
    padded = np.array([[0, 6, 7], [1, 2, 4]])
    assert padded_item_keys(padded, 10).tolist() == [6, 7, 11, 12, 14]
    round_trip = SequenceCorpus.from_padded(padded, padded)
    assert round_trip.offsets.tolist() == [0, 2, 5]


@pytest.mark.parametrize("popularity", [None, np.array([0, 50, 1, 1, 1, 1, 30, 1, 1, 1, 1.0])])
def test_negatives_never_hit_excluded_items(popularity) -> None:
    sampler = NegativeSampler(10, popularity, exponent=1.0)
    rng = np.random.default_rng(0)
    excluded = np.sort(np.array([1, 2, 3, 11 + 6, 11 + 1]))  # row 0: items 1,2,3; row 1: items 6,1 (stride 11)
    draws = sampler.sample(rng, (2, 500, 3), excluded, stride=11)
    assert draws.min() >= 1 and draws.max() <= 10
    assert not np.isin(draws[0], [1, 2, 3]).any()
    assert not np.isin(draws[1], [1, 6]).any()
    assert set(np.unique(draws[0])) == set(range(4, 11))
    with pytest.raises(ValueError, match="sorted"):
        sampler.sample(rng, (2, 5), np.array([17, 1]), stride=11)


def test_popularity_sampler_follows_counts() -> None:
    counts = np.array([0, 100, 0, 0, 1.0])
    draws = NegativeSampler(4, counts, exponent=1.0).sample(np.random.default_rng(1), (1, 5000), np.array([]), 5)
    assert set(np.unique(draws)) <= {1, 4}
    assert (draws == 1).mean() > 0.95


def test_training_batch_shifts_targets_by_one() -> None:
    items = np.array([[0, 4, 5, 6]])
    behaviours = np.array([[0, 1, 2, 3]])
    batch = training_batch(items, behaviours, np.array([4, 5, 6]), NegativeSampler(9), 2, np.random.default_rng(0))
    assert batch.input_items.tolist() == [[0, 4, 5]]
    assert batch.target_items.tolist() == [[4, 5, 6]]
    assert batch.target_behaviours.tolist() == [[1, 2, 3]]
    assert batch.has_target.tolist() == [[False, True, True]]
    assert batch.negatives.shape == (1, 3, 2) and not np.isin(batch.negatives, [4, 5, 6]).any()


def test_vocabulary_grows_in_order_of_first_appearance() -> None:
    vocab = Vocabulary(["b", "a"])
    assert vocab.add(np.array(["c", "a", "d", "c"], dtype=object)).tolist() == [3, 2, 4, 3]
    assert vocab.ids() == ["b", "a", "c", "d"] and vocab.table_size == 5
    assert vocab.lookup(["d", "zz"]).tolist() == [4, 0]
    assert vocab.id_of([1, 4]) == ["b", "d"]
    assert "a" in vocab and "zz" not in vocab


def test_ranks_count_ties_against_the_positive() -> None:
    scores = np.array([[0.5, 0.9, 0.1, 0.5], [2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    assert rank_among(scores).tolist() == [2, 0, 3]


def test_full_rank_ignores_padding_column() -> None:
    scores = np.array([[np.inf, 0.2, 0.9, 0.4], [-np.inf, 0.3, 0.2, 0.1]])
    assert rank_in_full(scores, np.array([3, 1])).tolist() == [1, 0]


def test_full_rank_skips_excluded_items_but_ranks_an_excluded_positive() -> None:
    scores = np.array([[0.0, 0.9, 0.8, 0.5, 0.7]])
    excluded = np.array([[False, True, False, True, False]])
    assert rank_in_full(scores, np.array([3])).tolist() == [3]
    assert rank_in_full(scores, np.array([3]), excluded).tolist() == [2]  # 1 excluded, 3 is itself


def test_case_values_per_rank() -> None:
    ranks = np.array([0, 1, 4, 12])
    assert case_values(ranks, "hr@5").tolist() == [1.0, 1.0, 1.0, 0.0]
    np.testing.assert_allclose(case_values(ranks, "ndcg@2"), [1.0, 1 / math.log2(3), 0.0, 0.0])
    np.testing.assert_allclose(case_values(ranks, "mrr"), 1 / (ranks + 1.0))
    with pytest.raises(ValueError, match="unknown metric"):
        case_values(ranks, "recall@5")


def test_metrics_on_hand_made_ranks() -> None:
    ranks = np.array([0, 1, 4, 12])
    assert hit_rate(ranks, 1) == 0.25
    assert hit_rate(ranks, 5) == 0.75
    expected = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6)) / 4
    assert ndcg(ranks, 5) == pytest.approx(expected)
    assert ndcg(ranks, 20) == pytest.approx(expected + 1 / math.log2(14) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)
    summary = summarize(ranks, [5], prefix="x.")
    assert set(summary) == {"x.hr@5", "x.ndcg@5", "x.mrr"}
    assert math.isnan(hit_rate(np.array([], dtype=np.int64), 5))


def test_most_popular_scores_by_count() -> None:
    baseline = MostPopular(np.array([0, 3, 9, 1, 9]))
    scores = baseline.score_all(np.zeros((2, 4), dtype=np.int64), np.zeros((2, 4), dtype=np.int64))
    assert scores.shape == (2, 5) and scores[0, 0] == -np.inf
    _, best = top_k_of_scores(np.array(scores), 3)
    assert sorted(best[0, :2].tolist()) == [2, 4] and best[0, 2] == 1 and (best[1] == best[0]).all()
