"""The dashboard's history: fixed memory whatever the run length, freshness quantiles from the
histogram's bucket deltas, the published-HR tracker (hit, miss, cold, LRU bound) and the series
the timeline derives from the service's metrics."""

from __future__ import annotations

import json
import math
import time

import pytest

from consumers.serve.published_hits import PublishedHits
from consumers.serve.timeline import Timeline, histogram_buckets, histogram_quantile
from consumers.telemetry import LATENCY_BUCKETS_S, ServiceMetrics

POINTS = 20
EVERY_S = 0.5
START = 1.7e9  # unix s of the first sample
TOPIC = "recommendations"


def metrics_with_delivery(stats: dict) -> ServiceMetrics:
    metrics = ServiceMetrics(10.0)
    metrics.watch_delivery(lambda: stats, lambda: 0)
    return metrics


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    bounds = [0.1, 0.5, 1.0, math.inf]
    # 10 observations in (0, 0.1], 10 in (0.5, 1.0]
    cumulative = [10.0, 10.0, 20.0, 20.0]
    assert histogram_quantile(0.5, bounds, cumulative) == pytest.approx(0.1)
    assert histogram_quantile(0.25, bounds, cumulative) == pytest.approx(0.05)
    assert histogram_quantile(0.75, bounds, cumulative) == pytest.approx(0.75)
    assert histogram_quantile(0.99, bounds, [0.0, 0.0, 0.0, 5.0]) == pytest.approx(1.0)  # +Inf: last bound
    assert histogram_quantile(0.5, bounds, [0.0, 0.0, 0.0, 0.0]) is None


def test_freshness_quantiles_are_over_the_last_interval_only() -> None:
    metrics = metrics_with_delivery({})
    timeline = Timeline(metrics, EVERY_S, POINTS, TOPIC)
    for _ in range(100):
        metrics.freshness.observe(0.003)  # an old, fast interval
    timeline.sample(START)
    for _ in range(100):
        metrics.freshness.observe(7.0)  # (5, 10] s
    timeline.sample(START + EVERY_S)
    timeline.sample(START + 2 * EVERY_S)  # nothing sent in this interval
    series = timeline.to_json()["series"]
    p50 = [v for _, v in series["freshness_p50_s"]]
    assert p50[0] == pytest.approx(0.0025)
    assert p50[1] == pytest.approx(7.5)
    assert p50[2] is None
    assert 5.0 < series["freshness_p99_s"][1][1] <= 10.0
    histogram = timeline.to_json()["freshness_histogram"]
    assert histogram["le"] == [*LATENCY_BUCKETS_S, None]
    assert sum(histogram["count"]) == 200 and histogram["count"][0] == 100
    bounds, cumulative = histogram_buckets(metrics.freshness)
    assert math.isinf(bounds[-1]) and cumulative[-1] == 200


def test_memory_and_payload_stay_bounded_over_a_long_run() -> None:
    stats = {"acknowledged": {TOPIC: 0}, "failed": {TOPIC: 0}, "given_up": {}}
    metrics = metrics_with_delivery(stats)
    hits = PublishedHits(10)
    timeline = Timeline(metrics, EVERY_S, POINTS, TOPIC, hits)
    for b in ("pv", "buy"):
        metrics.alpha.labels(b).set(0.5)
        metrics.train_loss_by_behaviour.labels(b).set(0.7)
    sizes = []
    for step in range(100 * POINTS):
        metrics.count_applied(100)
        metrics.freshness.observe(0.2)
        metrics.lag.labels("behaviours", str(step % 4)).set(step % 7)
        metrics.dead_letters.labels("invalid_json" if step % 2 else "schema").inc()
        metrics.drifts.labels("pv", "loss", "adwin").inc()
        stats["acknowledged"][TOPIC] += 3
        hits.published(f"u{step}", ["a"], float(step))
        hits.observe([f"u{step}"], ["a"])
        timeline.sample(START + step * EVERY_S)
        if step + 1 in (POINTS, 10 * POINTS, 100 * POINTS):
            sizes.append(len(json.dumps(timeline.to_json(), separators=(",", ":"))))
    data = timeline.to_json()
    assert all(len(series) == POINTS for series in data["series"].values())
    assert all(len(series) == POINTS for group in data["keyed"].values() for series in group.values())
    assert sorted(data["keyed"]["lag"]) == [f"behaviours[{p}]" for p in range(4)]
    assert len(data["drifts"]) == POINTS and data["drifts"][-1][1:] == ["pv", 1]
    assert len(hits) == 10
    assert max(sizes) <= min(sizes) * 1.05, sizes  # the same number of points, digits aside
    assert data["series"]["outputs_acknowledged"][-1][1] == 3 * 100 * POINTS
    assert data["series"]["events_per_s"][-1][1] == pytest.approx(100 / EVERY_S)
    assert data["series"]["hr_published"][-1][1] == 1.0


def test_since_answers_only_the_points_after_it() -> None:
    metrics = metrics_with_delivery({})
    timeline = Timeline(metrics, EVERY_S, POINTS, TOPIC)
    for step in range(3):
        metrics.count_applied(10)
        metrics.alpha.labels("pv").set(0.1 * step)
        metrics.drifts.labels("pv", "loss", "adwin").inc()
        timeline.sample(START + step * EVERY_S)
    whole = timeline.to_json()
    assert whole["since"] is None and len(whole["series"]["events_per_s"]) == 3
    newer = timeline.to_json(since=START + EVERY_S)
    assert newer["since"] == START + EVERY_S and newer["now"] == whole["now"]
    assert all(series == whole["series"][name][2:] for name, series in newer["series"].items())
    assert newer["keyed"]["alpha"]["pv"] == whole["keyed"]["alpha"]["pv"][2:]
    assert newer["drifts"] == whole["drifts"][2:]
    assert newer["freshness_histogram"] == whole["freshness_histogram"]  # always whole
    latest = timeline.to_json(since=whole["now"])  # a client polling faster than the samples
    assert all(series == [] for series in latest["series"].values()) and latest["drifts"] == []
    assert timeline.to_json(since=START - 1.0)["series"] == whole["series"]


def test_hit_rates_per_interval_beside_popularity() -> None:
    metrics = metrics_with_delivery({})
    hits = PublishedHits(100)
    timeline = Timeline(metrics, EVERY_S, POINTS, TOPIC, hits)
    hits.published("u1", ["a", "b"], 1.0, popular=["a", "c", "y"])
    hits.published("u2", ["c"], 1.0, popular=["c", "z"])
    hits.observe(["u1", "u1", "u2", "u2", "cold"], ["a", "x", "c", "z", "a"])
    timeline.sample(START)
    timeline.sample(START + EVERY_S)
    series = timeline.to_json()["series"]
    assert series["hr_published"][0][1] == pytest.approx(0.5)  # a and c hit; x and z missed
    assert series["hr_popularity"][0][1] == pytest.approx(0.75)  # a, c and z in the users' popularity lists
    assert series["hr_events"][0][1] == 4  # the cold user is not counted
    assert series["hr_published"][1][1] is None


def test_hit_tracker_hit_miss_cold_and_lru_bound() -> None:
    hits = PublishedHits(2)
    hits.observe(["u1"], ["a"])
    assert hits.totals().cold == 1 and hits.totals().counted == 0
    hits.published("u1", ["a", "b"], at=10.0)
    hits.published("u1", ["c"], at=5.0)  # acknowledged late, older: ignored
    hits.observe(["u1", "u1"], ["a", "c"])
    assert (hits.totals().hits, hits.totals().misses) == (1, 1)
    hits.published("u2", ["x"], at=11.0)
    hits.published("u3", ["y"], at=12.0)  # u1, least recently published, is dropped
    assert len(hits) == 2
    hits.observe(["u1", "u2", "u3"], ["a", "x", "q"])
    totals = hits.totals()
    assert (totals.hits, totals.misses, totals.cold) == (2, 2, 2)
    with pytest.raises(ValueError):
        PublishedHits(0)


def test_the_sampler_thread_samples_and_stops() -> None:
    metrics = metrics_with_delivery({})
    timeline = Timeline(metrics, 0.02, POINTS, TOPIC).start()
    try:
        deadline = time.monotonic() + 10.0
        while not timeline.to_json()["series"]["model_version"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        timeline.stop()
    assert timeline.to_json()["now"] is not None
