"""The synthetic stream: seeded, labelled, time-ordered, with the documented funnel and drifts."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError

from stream.config import DriftSpec, SyntheticConfig
from stream.logs import LOG_EVENT_SCHEMA, read_log
from stream.replay import is_synthetic_table
from stream.synthetic import CAUSES, generate, is_synthetic_log, measured_conversion

SMALL = {"n_events": 30_000, "n_users": 300, "n_items": 500, "n_clusters": 10}


@pytest.fixture(scope="module")
def drifted():
    return generate(
        SyntheticConfig(
            **SMALL,
            cart_conversion=0.6,
            drifts=[{"at_event": 15_000, "behaviour": "cart", "conversion": 0.0}],
        )
    )


def test_seeded_and_deterministic():
    a, b = generate(SyntheticConfig(**SMALL, seed=3)), generate(SyntheticConfig(**SMALL, seed=3))
    assert a.events.equals(b.events)
    assert not a.events.equals(generate(SyntheticConfig(**SMALL, seed=4)).events)


def test_columns_order_and_labels(drifted):
    events = drifted.events
    assert events.num_rows == SMALL["n_events"]
    assert events.schema.equals(LOG_EVENT_SCHEMA)  # metadata aside, the log readers' columns
    assert is_synthetic_table(events)
    assert (np.diff(events.column("timestamp").to_numpy()) >= 0).all()
    assert all(u.startswith("syn-u") for u in events.column("user_id").unique().to_pylist())
    assert all(i.startswith("syn-i") for i in events.column("item_id").unique().to_pylist())
    assert set(events.column("behavior").unique().to_pylist()) == {"pv", "cart", "fav", "buy"}
    assert drifted.source_name == "synthetic-seed0"


def test_truth_explains_every_event(drifted):
    truth, events = drifted.truth, drifted.events
    users = events.column("user_id").to_pylist()
    items = events.column("item_id").to_pylist()
    behaviours = events.column("behavior").to_pylist()
    expected_behaviour = {"view": "pv", "cart": "cart", "fav": "fav", "buy_after_cart": "buy",
                          "buy_after_fav": "buy", "direct_buy": "buy"}
    expected_trigger = {"cart": "pv", "fav": "pv", "direct_buy": "pv", "buy_after_cart": "cart",
                        "buy_after_fav": "fav"}
    for row in range(events.num_rows):
        cause = CAUSES[truth.cause[row]]
        assert behaviours[row] == expected_behaviour[cause]
        trigger = truth.trigger[row]
        if cause == "view":
            assert trigger == -1
        else:
            assert 0 <= trigger < row
            assert (users[trigger], items[trigger]) == (users[row], items[row])
            assert behaviours[trigger] == expected_trigger[cause]


def test_funnel_rates_match_the_config(drifted):
    cfg = drifted.truth.config
    causes = Counter(CAUSES[c] for c in drifted.truth.cause)
    views = causes["view"]
    assert causes["cart"] / views == pytest.approx(cfg.cart_rate, abs=0.015)
    assert causes["fav"] / views == pytest.approx(cfg.fav_rate, abs=0.01)
    rate, counted = measured_conversion(drifted.events, "fav", cfg.horizon_s)
    assert counted > 500 and rate == pytest.approx(cfg.fav_conversion, abs=0.06)


def test_conversion_drift_is_strong_and_measurable(drifted):
    horizon = drifted.truth.config.horizon_s
    before, n_before = measured_conversion(drifted.events, "cart", horizon, 0, 15_000)
    after, n_after = measured_conversion(drifted.events, "cart", horizon, 15_000)
    assert n_before > 500 and n_after > 500
    assert before == pytest.approx(0.6, abs=0.05)
    assert after < 0.03
    assert drifted.truth.conversion_at("cart", 14_999) == 0.6
    assert drifted.truth.conversion_at("cart", 15_000) == 0.0
    assert drifted.truth.rate_at("cart", 20_000) == drifted.truth.config.cart_rate


def test_new_items_appear_over_time(drifted):
    births = drifted.truth.item_birth_event
    new = births[births >= 0]
    assert new.size > 20 and new.max() > SMALL["n_events"] // 2
    assert drifted.truth.item_cluster.size == SMALL["n_items"] + new.size


def test_taste_shuffle_and_rate_drift():
    stream = generate(
        SyntheticConfig(**SMALL, drifts=[{"at_event": 10_000, "taste_shuffle": 0.5},
                                         {"at_event": 10_000, "behaviour": "fav", "rate": 0.0}])
    )
    ((at, users, new),) = stream.truth.taste_changes
    assert at == 10_000 and users.size == SMALL["n_users"] // 2
    assert np.allclose(stream.truth.taste_at(10_000)[users], new)
    assert not np.allclose(stream.truth.taste_at(9_999)[users], new)
    favs = [i for i, c in enumerate(stream.truth.cause) if CAUSES[c] == "fav"]
    assert all(stream.truth.trigger[i] < 10_000 for i in favs)


def test_tastes_shape_what_users_view(drifted):
    truth, events = drifted.truth, drifted.events
    views = [i for i, c in enumerate(truth.cause) if CAUSES[c] == "view"]
    users = np.array([int(u[5:]) for u in events.column("user_id").to_pylist()])[views]
    items = np.array([int(i[5:]) for i in events.column("item_id").to_pylist()])[views]
    taste_of_viewed = truth.user_taste[users, truth.item_cluster[items]]
    # Users view clusters they like far more than a uniform taste (1 / n_clusters) would.
    assert taste_of_viewed.mean() > 3 / SMALL["n_clusters"]


def test_write_is_a_labelled_generic_log(tmp_path):
    stream = generate(SyntheticConfig(n_events=500, n_users=20, n_items=30))
    path = stream.write(tmp_path / "syn")
    assert path.name == "events.csv.gz" and is_synthetic_log(path) and is_synthetic_log(path.parent)
    marker = json.loads((path.parent / "SYNTHETIC.json").read_text())
    assert marker["synthetic"] is True and marker["config"]["n_events"] == 500
    loaded = read_log(path.parent, "generic")
    assert loaded.events.select(["user_id", "item_id", "behavior"]).equals(
        stream.events.select(["user_id", "item_id", "behavior"]).replace_schema_metadata(None)
    )
    assert np.allclose(loaded.events.column("timestamp").to_numpy(), stream.events.column("timestamp").to_numpy())
    assert not is_synthetic_log(tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"at_event": 5},
        {"at_event": 5, "conversion": 0.1},
        {"at_event": 5, "behaviour": "buy", "conversion": 0.1},
        {"at_event": -1, "taste_shuffle": 0.1},
    ],
)
def test_invalid_drifts(bad):
    with pytest.raises(ValidationError):
        DriftSpec(**bad)


def test_rates_must_leave_room():
    with pytest.raises(ValidationError):
        SyntheticConfig(cart_rate=0.6, fav_rate=0.5)
    with pytest.raises(ValueError, match="exceed 1"):
        generate(SyntheticConfig(n_events=100, drifts=[{"at_event": 10, "behaviour": "buy", "rate": 0.9}]))
