"""`Service.set_alpha` end to end on the test broker: the next fine-tuning round trains with the
new alpha (the registry records the version with it), and a restarted service starts from the
store's alpha history, not from the configured alpha."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.serve.service import Service
from tests.consumers.serve.test_service import (
    cluster_events,
    fine_tune,
    produce,
    run_until,
    service_on,
    service_settings,
)

pytestmark = pytest.mark.integration

READY_S = 120.0  # the trainer process starts in seconds; only a hung one takes this long


def test_a_set_alpha_reaches_the_next_round_and_outlives_a_restart(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, kafka_config, topic_names)
    events = cluster_events(10, range(0, 12), "a", 3, 1.7e9)
    service = service_on(kafka_bootstrap, settings, events)
    try:
        start = service.current_alpha()
        assert start == settings.behaviours.alpha  # a new store: the configured alpha
        changed = {"cart": round(start["cart"] / 4 + 0.01, 6)}
        assert changed["cart"] != start["cart"]
        run_until(service, lambda: service.report.events_applied == len(events) and service.publisher.pending == 0)
        assert service.trainer.ready(wait_s=READY_S)
        fine_tune(service, steps=3)
        old = service.set_alpha(changed, "test: a drift policy's change")
        assert old == start and service.current_alpha() == {**start, **changed}
        fine_tune(service, steps=3)
        models = service.store.registry.models()
        assert [(m["version"], m["alpha"]) for m in models] == [(1, start), (2, {**start, **changed})]
    finally:
        service.stop()
        service.run(until=lambda s: True)

    restarted = Service(settings, kafka_bootstrap)
    try:
        assert restarted.current_alpha() == {**start, **changed}  # the history, not the settings
        assert restarted.metrics.registry.get_sample_value("casm_alpha", {"behaviour": "cart"}) == changed["cart"]
        assert restarted.trainer.ready(wait_s=READY_S)
        more = cluster_events(10, range(0, 12), "a", 4, 1.7e9 + 1e3)
        produce(kafka_bootstrap, settings, more)
        run_until(restarted, lambda: restarted.report.events_applied == len(more))  # this run's count
        fine_tune(restarted, steps=3)
        assert restarted.store.registry.latest_model()["alpha"] == {**start, **changed}
    finally:
        restarted.stop()
        restarted.run(until=lambda s: True)
