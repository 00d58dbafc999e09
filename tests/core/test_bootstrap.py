"""Bootstrap intervals over users: coverage of a known difference, exact zero for identical
arrays, narrowing with more users, per-user averaging over seeds."""

from __future__ import annotations

import numpy as np
import pytest

from casm_core.bootstrap import (
    bootstrap_means,
    interval,
    metric_interval,
    paired_difference,
    per_case,
)

MISS = 50  # a rank outside every K used here


def test_identical_rank_arrays_give_exactly_zero() -> None:
    ranks = np.random.default_rng(0).integers(0, 30, size=400)
    diff = paired_difference(ranks, ranks.copy(), "ndcg@10", replicates=300, seed=1)
    assert (diff.mean, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert not diff.excludes_zero()


def test_interval_covers_a_constructed_difference() -> None:
    # 1000 users: the model hits (rank 0) for 600 of them, the baseline for 400 of those 600,
    # so the per-user HR@10 difference is 1 for 200 users and 0 otherwise: exactly 0.2.
    rng = np.random.default_rng(3)
    model = np.where(np.arange(1000) < 600, 0, MISS)
    baseline = np.where(np.arange(1000) < 400, 0, MISS)
    order = rng.permutation(1000)
    diff = paired_difference(model[order], baseline[order], "hr@10", replicates=1000, seed=0)
    assert diff.mean == pytest.approx(0.2)
    assert diff.low < 0.2 < diff.high
    assert diff.excludes_zero()
    # Pairing uses the correlation: the difference's interval is narrower than the model's own.
    a, b = metric_interval(model[order], "hr@10", 1000, 0), metric_interval(baseline[order], "hr@10", 1000, 0)
    assert diff.high - diff.low < a.high - a.low
    assert a.mean == pytest.approx(0.6) and b.mean == pytest.approx(0.4)


def test_coverage_of_the_true_mean_difference_is_near_nominal() -> None:
    # Users hit with the model with p 0.5, with the baseline with p 0.4 (independently): the true
    # mean HR difference is 0.1. Over 100 seeded samples of 300 users, ~95 % of intervals cover it.
    rng = np.random.default_rng(11)
    covered = 0
    trials = 100
    for trial in range(trials):
        model = np.where(rng.random(300) < 0.5, 0, MISS)
        baseline = np.where(rng.random(300) < 0.4, 0, MISS)
        diff = paired_difference(model, baseline, "hr@10", replicates=400, seed=trial)
        covered += diff.low <= 0.1 <= diff.high
    assert 0.88 <= covered / trials <= 1.0


def test_interval_narrows_with_more_users() -> None:
    rng = np.random.default_rng(5)
    widths = []
    for n in (100, 1000, 10000):
        values = rng.random(n)
        ci = interval(values, replicates=500, seed=0)
        assert ci.low <= ci.mean <= ci.high
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.3)  # ~ 1 / sqrt(n)


def test_a_users_cases_are_drawn_together() -> None:
    # Each user has two identical cases: resampling cases would pretend there are 2x the users.
    rng = np.random.default_rng(2)
    values = np.repeat(rng.random(2000), 2)
    users = np.repeat(np.arange(2000), 2)
    by_case = bootstrap_means(values, 500, 0).std()
    by_user = bootstrap_means(values, 500, 0, groups=users).std()
    assert by_user / by_case == pytest.approx(np.sqrt(2), rel=0.15)
    np.testing.assert_allclose(  # one case per user: grouping by user changes nothing
        bootstrap_means(values[::2], 50, 3, groups=np.arange(2000)), bootstrap_means(values[::2], 50, 3)
    )
    diff = paired_difference(np.zeros(4, np.int64), np.full(4, MISS), "hr@1", 100, 0, groups=np.array([7, 7, 9, 9]))
    assert (diff.mean, diff.low, diff.high) == (1.0, 1.0, 1.0)


def test_seeds_are_averaged_per_user_before_bootstrapping() -> None:
    ranks = np.array([[0, MISS, 0, 3], [MISS, MISS, 0, 1]])
    assert per_case(ranks, "hr@1").tolist() == [0.5, 0.0, 1.0, 0.0]
    assert metric_interval(ranks, "hr@1", 200, 0).mean == pytest.approx(0.375)
    with pytest.raises(ValueError, match="same cases"):
        paired_difference(ranks, ranks[:, :3], "hr@1", 10, 0)


def test_resamples_are_fixed_by_seed_and_empty_input_is_nan() -> None:
    values = np.arange(50, dtype=float)
    np.testing.assert_array_equal(bootstrap_means(values, 20, 4), bootstrap_means(values, 20, 4))
    assert not np.array_equal(bootstrap_means(values, 20, 4), bootstrap_means(values, 20, 5))
    assert np.isnan(interval(np.zeros(0), 10, 0).low)
