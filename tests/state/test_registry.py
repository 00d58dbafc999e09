"""Model registry, alpha history, drift log and last published recommendations."""

from __future__ import annotations

from pathlib import Path

import pytest

from state import RegistryError
from tests.state._synth import NOW, TOPIC, open_store, simple


def test_model_registry(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path) as store:
        assert store.registry.models() == [] and store.registry.latest_model() is None
        store.registry.register_model(2, 100.0, {"pv": 0.2, "buy": 0.3}, {"hr@10": 0.41}, "ckpt/2.pt")
        store.registry.register_model(1, 50.0, {"pv": 1.0}, {}, "ckpt/1.pt")
        with pytest.raises(RegistryError, match="version 2"):
            store.registry.register_model(2, 1.0, {}, {}, "x")
    with open_store(path) as store:
        models = store.registry.models()
        assert [m["version"] for m in models] == [1, 2]
        latest = store.registry.latest_model()
        assert latest == {"version": 2, "created_at": 100.0, "alpha": {"buy": 0.3, "pv": 0.2},
                          "metrics": {"hr@10": 0.41}, "checkpoint_path": "ckpt/2.pt",
                          "registered_at": NOW}


def test_alpha_history_and_drift_log_keep_their_order() -> None:
    with open_store() as store:
        store.registry.record_alpha(10.0, {"pv": 0.2}, "initial")
        store.registry.record_alpha(5.0, {"pv": 0.4}, "drift on pv")
        assert store.registry.alpha_history() == [
            {"at": 10.0, "alpha": {"pv": 0.2}, "reason": "initial"},
            {"at": 5.0, "alpha": {"pv": 0.4}, "reason": "drift on pv"},
        ]
        store.registry.record_drift(11.0, "pv", "adwin", "loss", 0.7, 0.2, 0.4)
        store.registry.record_drift(12.0, "buy", "page_hinkley", "ctr", 0.1, 0.3, 0.35)
        log = store.registry.drift_log()
        assert [d["behaviour"] for d in log] == ["pv", "buy"]
        assert log[0] == {"at": 11.0, "behaviour": "pv", "detector": "adwin", "signal": "loss",
                          "value": 0.7, "old_alpha": 0.2, "new_alpha": 0.4}


def test_last_published_per_user_is_replaced_set_based() -> None:
    with open_store() as store:
        store.apply(simple(["a", "b"], ["x", "y"], start=0, partition=3), {(TOPIC, 3): 2})
        n = store.registry.record_published(["a", "b", "ghost"], 1, [["x", "y"], ["y"], []],
                                   published_at=20.0)
        assert n == 3
        got = store.registry.last_published(["a", "b", "ghost", "nobody"])
        assert set(got) == {"a", "b", "ghost"}
        assert got["a"] == {"model_version": 1, "items": ["x", "y"], "published_at": 20.0,
                            "event_offset": 0, "topic": TOPIC, "partition": 3}
        assert got["ghost"]["partition"] is None and got["ghost"]["event_offset"] is None
        # A newer recommendation replaces the older; the last repeat of a user wins.
        store.registry.record_published(["a", "a"], 2, [["q"], ["z"]], event_offsets=[7, 9])
        again = store.registry.last_published(["a", "b"])
        assert again["a"]["items"] == ["z"] and again["a"]["model_version"] == 2
        assert again["a"]["event_offset"] == 9 and again["a"]["published_at"] == NOW
        assert again["b"]["items"] == ["y"]
        assert store.registry.record_published([], 3, []) == 0
        with pytest.raises(ValueError):
            store.registry.record_published(["a"], 3, [])
