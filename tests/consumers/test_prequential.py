"""Prequential scoring of published recommendations, and the recommendation wire format."""

from __future__ import annotations

import json
import math

import pytest

from consumers.prequential import PrequentialScorer, freshness_summary
from consumers.service import recommendation_json
from stream.models import Recommendation

EDGES = [0, 100, 1000]


def test_target_events_are_scored_against_the_last_list_sent_before_them() -> None:
    scorer = PrequentialScorer("buy", k=3, grace_ms=50, freshness_edges_ms=EDGES)
    scorer.recommendation("u", ["a", "b", "c"], at_ms=1000, model_version="1", source="model", event_produced_ms=950)
    scorer.event("u", "b", "buy", at_ms=1500)          # rank 1 in the list of t=1000
    scorer.event("u", "x", "pv", at_ms=1600)           # not a target: only counted
    scorer.event("v", "a", "buy", at_ms=1700)          # v had nothing: cold
    # A list published after the event must not count for it, even if it arrives first.
    scorer.recommendation("u", ["z", "y", "x"], at_ms=2100, model_version="2", source="model")
    scorer.event("u", "z", "buy", at_ms=2000)          # scored against t=1000's list: miss
    assert scorer.flush(now_ms=1540) == 0               # still within the grace period
    assert scorer.flush(now_ms=1560) == 1
    scorer.flush()
    summary = scorer.summary()
    assert summary["target_events"] == 3 and summary["scored"] == 2 and summary["cold"] == 1
    assert summary["hr@3"] == 0.5
    assert summary["ndcg@3"] == pytest.approx(0.5 / math.log2(3))
    assert summary["mrr"] == pytest.approx(0.25)
    assert scorer.events_seen == {"buy": 3, "pv": 1}
    assert summary["freshness_count"] == 1 and summary["freshness_p50_ms"] == 50


def test_out_of_order_recommendations_are_placed_by_time() -> None:
    scorer = PrequentialScorer("buy", k=2, grace_ms=0, freshness_edges_ms=EDGES)
    scorer.recommendation("u", ["late"], at_ms=300, model_version="2", source="model")
    scorer.recommendation("u", ["early"], at_ms=100, model_version="1", source="popularity")
    scorer.event("u", "early", "buy", at_ms=200)
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
