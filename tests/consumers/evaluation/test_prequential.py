"""Prequential scoring of published recommendations, and the recommendation wire format."""

from __future__ import annotations

import json
import math

import pytest

from consumers.evaluation.prequential import PrequentialScorer, freshness_summary
from consumers.serve.publisher import recommendation_json
from stream.models import Recommendation

EDGES = [0, 100, 1000]


def test_wall_clock_scores_events_against_the_last_list_sent_before_them() -> None:
    scorer = PrequentialScorer("buy", k=3, freshness_edges_ms=EDGES, clock="wall", grace_ms=50)
    scorer.recommendation("u", ["a", "b", "c"], 1000, "1", "model", published_ms=1000, event_produced_ms=950)
    scorer.event("u", "b", "buy", 1500, position=10)   # rank 1 in the list of t=1000
    scorer.event("u", "x", "pv", 1600, position=11)    # not a target: per behaviour only
    scorer.event("v", "a", "buy", 1700, position=12)   # v had nothing: cold
    # A list published after the event must not count for it, even if it arrives first.
    scorer.recommendation("u", ["z", "y", "x"], 2100, "2", "model")
    scorer.event("u", "z", "buy", 2000, position=13)   # scored against t=1000's list: miss
    assert scorer.flush(now_ms=1540) == 0                  # still within the grace period
    assert scorer.flush(now_ms=1560) == 1
    scorer.flush()
    summary = scorer.summary(window_events=12)
    assert summary["target_events"] == 3 and summary["scored"] == 2 and summary["cold"] == 1
    assert summary["hr@3"] == 0.5
    assert summary["ndcg@3"] == pytest.approx(0.5 / math.log2(3))
    assert summary["mrr"] == pytest.approx(0.25)
    assert summary["by_behaviour"]["pv"]["n"] == 1 and summary["by_behaviour"]["pv"]["hr@3"] == 0.0
    assert [w["n"] for w in summary["by_window"]] == [1, 1]
    assert summary["freshness_count"] == 1 and summary["freshness_p50_ms"] == 50


def test_event_order_clock_uses_the_lists_that_reflect_earlier_events() -> None:
    scorer = PrequentialScorer("buy", k=2, freshness_edges_ms=EDGES, clock="event_order")
    # u's events at offsets 5, 9, 12 (one partition); lists reflecting offsets 5 and 9 arrive late.
    scorer.event("u", "a", "pv", 5, position=1)
    scorer.event("u", "b", "buy", 9, position=2)
    scorer.event("u", "c", "buy", 12, position=3)
    assert scorer.flush(now_ms=10**12) == 0                    # event order does not use time
    scorer.recommendation("u", ["b", "x"], 5, "1", "model")   # reflects offset 5: scores offset 5
    assert len(scorer.scored) == 1 and scorer.scored[0].cold   # nothing before offset 5
    scorer.recommendation("u", ["y", "c"], 9, "1", "model")   # scores offset 9 with the list of 5
    assert scorer.scored[1].rank == 0 and scorer.scored[1].model_version == "1"
    scorer.flush()                                             # offset 12: list of 9
    assert scorer.scored[2].rank == 1
    assert scorer.summary()["hr@2"] == 1.0


def test_out_of_order_recommendations_are_placed_by_time() -> None:
    scorer = PrequentialScorer("buy", k=2, freshness_edges_ms=EDGES)
    scorer.recommendation("u", ["late"], 300, "2", "model")
    scorer.recommendation("u", ["early"], 100, "1", "popularity")
    scorer.event("u", "early", "buy", 200, position=0)
    scorer.flush()
    assert scorer.scored[0].rank == 0 and scorer.scored[0].source == "popularity"


def test_freshness_histogram_bins_and_overflow() -> None:
    summary = freshness_summary([10, 50, 150, 999, 1000, 5000], EDGES)
    assert summary["freshness_histogram"] == [["0-100", 2], ["100-1000", 2], [">=1000", 2]]
    assert summary["freshness_max_ms"] == 5000


def test_recommendation_json_is_a_valid_recommendation() -> None:
    raw = recommendation_json(
        "u1", ["i1", "i2"], [0.5, -1.25], "7", 1.7e9,
        event_time=1.6e9, event_partition=3, event_offset=41, event_produced_ms=1_700_000_000_123,
        source="model",
    )
    parsed = Recommendation.model_validate_json(raw)
    assert parsed.items[1].item_id == "i2" and parsed.items[1].score == -1.25
    assert parsed.event_offset == 41 and parsed.source == "model"
    assert json.loads(raw) == json.loads(parsed.to_json_bytes())
