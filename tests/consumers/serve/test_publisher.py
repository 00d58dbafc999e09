"""The publisher's lists without a broker: the recent-items recommender, and exclusions applied
to every list (the model's, the baselines', the popularity fallback's) through one top-K."""

from __future__ import annotations

import json

import numpy as np
import pytest

from consumers.serve.published_hits import PublishedHits
from consumers.serve.publisher import Publisher
from consumers.serve.ranking import PopularItems, exclusions, ranked_lists
from consumers.serve.service import open_store
from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings, ServeConfig
from consumers.telemetry import ServiceMetrics
from stream.models import Recommendation
from tests.state._synth import events


class Producer:
    """Keeps what is sent, as KafkaProducer.send is called."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    def send(self, topic: str, key: bytes, value: bytes, on_ack=None, on_fail=None) -> None:
        self.sent.append((topic, key, value))
        if on_ack is not None:
            on_ack(None)  # acknowledged at once


def make_publisher(hits: PublishedHits | None = None, **serve) -> tuple[Publisher, Producer]:
    settings = CasmSettings(
        store={"path": ":memory:", "sequence_length": 6},
        model={"max_len": 5},
        serve={"metrics_port": None, "top_k": 4, "popularity_refresh_s": 1e6, **serve},
        progress=False,
    )
    store = open_store(settings)
    producer = Producer()
    publisher = Publisher(settings, store, producer, ServingModel(settings), ServiceMetrics(10.0), None, hits=hits)
    return publisher, producer


def apply(publisher: Publisher, rows: list[tuple[str, str, str]]) -> None:
    """(user, item, behaviour) events, in arrival order after what the store holds."""
    start = sum(publisher.store.offsets("behaviours").values())
    publisher.store.apply(events([
        {"user_id": u, "item_id": i, "behavior": b, "offset": start + n} for n, (u, i, b) in enumerate(rows)
    ]))


def published(publisher: Publisher, producer: Producer, users: list[str]) -> dict[str, Recommendation]:
    """Each user's list after refreshing `users` now (validated against the wire model)."""
    producer.sent.clear()
    publisher.touch(users, 0.0)
    publisher.work(force=True)
    return {key.decode(): Recommendation.model_validate_json(value) for _, key, value in producer.sent}


# Popularity: x (6 events) > y (5) > z (4) > w (3), by other users.
POPULAR = [(f"p{n}", item, "pv") for item, count in (("x", 6), ("y", 5), ("z", 4), ("w", 3)) for n in range(count)]


def ids(rec: Recommendation) -> list[str]:
    return [item.item_id for item in rec.items]


def test_recent_lists_the_window_newest_first_then_the_most_popular() -> None:
    publisher, producer = make_publisher(recommender="recent")
    apply(publisher, POPULAR + [("u", "a", "pv"), ("u", "x", "cart"), ("u", "b", "pv"), ("u", "a", "pv")])
    lists = published(publisher, producer, ["u", "nobody"])
    assert lists["u"].source == "recent"
    assert ids(lists["u"]) == ["a", "b", "x", "y"]  # a's newest occurrence is last; then the most popular
    assert lists["nobody"].source == "popularity" and ids(lists["nobody"]) == ["x", "y", "z", "w"]
    assert publisher.popularity_fallbacks == 1

    # An item newer than the popularity counts (refreshed rarely here) is still recent.
    apply(publisher, [("u", "fresh", "pv")])
    assert ids(published(publisher, producer, ["u"])["u"]) == ["fresh", "a", "b", "x"]


def test_recent_honours_the_exclusions() -> None:
    publisher, producer = make_publisher(recommender="recent", exclude_behaviours=["buy"])
    apply(publisher, POPULAR + [("u", "a", "pv"), ("u", "b", "buy"), ("u", "y", "buy")])
    assert ids(published(publisher, producer, ["u"])["u"]) == ["a", "x", "z", "w"]


@pytest.mark.parametrize("recommender", ["popularity", "casm"])  # casm: no model yet, the fallback
def test_popularity_lists_honour_each_users_exclusions(recommender: str) -> None:
    publisher, producer = make_publisher(recommender=recommender, exclude_behaviours=["buy"])
    apply(publisher, POPULAR + [("u", "x", "buy"), ("u", "z", "pv"), ("v", "w", "buy"), ("t", "y", "pv")])
    lists = published(publisher, producer, ["u", "v", "t", "nobody"])
    assert {rec.source for rec in lists.values()} == {"popularity"}
    # Counts now: x 7, y 6, z 5, w 4 (the only items); u bought x, v bought w, t bought nothing.
    assert ids(lists["u"]) == ["y", "z", "w"]  # x excluded; only 3 items are left
    assert ids(lists["v"]) == ["x", "y", "z"]
    assert ids(lists["t"]) == ids(lists["nobody"]) == ["x", "y", "z", "w"]  # nothing excluded: the shared list
    assert [item.score for item in lists["t"].items] == [7.0, 6.0, 5.0, 4.0]  # counts, as before


def test_the_published_hr_judges_popularity_with_the_same_exclusions() -> None:
    hits = PublishedHits(10)
    publisher, producer = make_publisher(hits, recommender="recent", exclude_behaviours=["buy"])
    apply(publisher, POPULAR + [("u", "x", "buy"), ("u", "a", "pv"), ("t", "b", "pv")])
    lists = published(publisher, producer, ["u", "t"])
    assert ids(lists["u"]) == ["a", "y", "z", "w"] and ids(lists["t"]) == ["b", "x", "y", "z"]
    # Target events (in the store's order; judged against the lists just acknowledged): popularity's
    # list for u lacks x (bought), as the served list does; t's has it.
    hits.observe(["u", "u", "t", "t"], ["x", "w", "x", "w"])
    totals = hits.totals()
    assert (totals.hits, totals.misses) == (2, 2)  # u's w and t's x listed; u's x excluded, t's w not listed
    assert totals.popular_hits == 3  # u: w (popularity's y, z, w, .. without x); t: x and w (x, y, z, w)


def test_popular_items_share_one_list_unless_an_exclusion_hits_it() -> None:
    popular = PopularItems(np.array([0, 1, 9, 5, 7, 3]))
    window = np.zeros((3, 2), dtype=np.int64)
    exclude = np.array([[0, 0], [1, 0], [2, 4]])  # item 1 is not in the top 3: the shared list stands
    lists = ranked_lists(popular, window, window, 3, exclude)
    assert [best.tolist() for best, _ in lists] == [[2, 4, 3], [2, 4, 3], [3, 5, 1]]
    assert lists[2][1].tolist() == [5.0, 3.0, 1.0]
    # Items beyond the ranker's vocabulary are ignored, not clamped onto its last item.
    assert ranked_lists(popular, window[:1], window[:1], 5, np.array([[6, 9]]))[0][0].tolist() == [2, 4, 3, 5, 1]


def test_exclusions_follow_the_configured_behaviours() -> None:
    items, behaviours = np.array([[0, 3, 4, 5]]), np.array([[0, 1, 2, 1]])
    np.testing.assert_array_equal(exclusions(items, behaviours, ["pv", "buy"], ["pv"]), [[0, 3, 0, 5]])
    assert exclusions(items, behaviours, ["pv", "buy"], ["fav"]) is None
    assert exclusions(items, behaviours, ["pv", "buy"], []) is None


def test_only_the_model_recommender_has_a_model() -> None:
    assert ServeConfig(recommender="casm").has_model
    assert not ServeConfig(recommender="popularity").has_model
    assert not ServeConfig(recommender="recent").has_model


def test_recommendations_are_valid_json_for_every_source() -> None:
    publisher, producer = make_publisher(recommender="recent")
    apply(publisher, [("u", "a", "pv")])
    published(publisher, producer, ["u"])
    assert json.loads(producer.sent[0][2])["source"] == "recent"


def test_a_behaviour_the_vocabulary_lacks_is_refused_in_the_settings() -> None:
    from pydantic import ValidationError

    from consumers.settings import CasmSettings

    for field in ("exclude_behaviours", "popularity_behaviours"):
        with pytest.raises(ValidationError, match=f"serve.{field} names \\['byu'\\]"):
            CasmSettings(serve={field: ["buy", "byu"]})
    assert CasmSettings(events={"open_vocabulary": True}, serve={"exclude_behaviours": ["later"]})  # may appear
