"""`/metrics` and `/healthz` of the service's telemetry server, over real HTTP on a free port:
Prometheus text with the metric names the README documents, and the health callable's answer as
200 (`status: ok`) or 503 with its reasons in `problems`."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from consumers.telemetry import ServiceMetrics, TelemetryServer
from stream.broker import free_port
from tests.conftest import REPO_ROOT

HOST = "127.0.0.1"
TIMEOUT_S = 30.0  # a loopback answer takes milliseconds; this only bounds a hung server
RATE_WINDOW_S = 10.0

#: What README's "Health and metrics" promises, by metric family (the exposition's `# TYPE` name).
PROMISED = {
    "casm_events_per_second", "casm_consumer_lag", "casm_dead_letters", "casm_refresh_latency_seconds",
    "casm_freshness_seconds", "casm_train_loss_by_behaviour", "casm_model_version", "casm_trainer_steps",
    "casm_trainer_steps_per_second", "casm_trainer_errors", "casm_trainer_restarts", "casm_alpha",
    "casm_drift_detections", "casm_produce_sent", "casm_produce_acknowledged", "casm_produce_failed",
    "casm_produce_given_up", "casm_producer_rebuilds", "casm_recommendations_published",
    "casm_recommendations_failed", "casm_dead_letter_holds", "casm_offset_out_of_range",
}


class Health:
    """A health callable the test drives: healthy until `problems` are given."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.calls = 0

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        self.calls += 1
        ok = not self.problems
        return ok, {"status": "ok" if ok else "unhealthy", "problems": list(self.problems)}


@pytest.fixture
def served() -> Iterator[tuple[str, ServiceMetrics, Health]]:
    metrics = ServiceMetrics(RATE_WINDOW_S)
    delivery = {"sent": {"recommendations": 3}, "acknowledged": {"recommendations": 2},
                "failed": {"recommendations": 1}, "given_up": {}}
    metrics.watch_delivery(lambda: delivery, lambda: 1)
    health = Health()
    server = TelemetryServer(metrics, health, HOST, free_port(HOST)).start()
    try:
        yield server.address, metrics, health
    finally:
        server.stop()


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


def test_metrics_are_prometheus_text_with_the_documented_names(served) -> None:
    address, metrics, _ = served
    metrics.count_applied(5, now=0.0)
    metrics.count_applied(5, now=1.0)
    metrics.published.labels("model").inc()
    metrics.alpha.labels("buy").set(0.25)
    status, content_type, body = get(address + "/metrics")
    assert status == 200 and content_type.startswith("text/plain")  # the Prometheus text format
    text = body.decode()
    # A counter's family is exposed as `<name>_total`: the names below are without that suffix.
    families = set(re.findall(r"^# TYPE (\S+?)(?:_total)? \S+$", text, flags=re.MULTILINE))
    assert PROMISED <= families, sorted(PROMISED - families)
    # Every name the README spells out exists (`..._acknowledged`-style short forms are in PROMISED).
    readme = (REPO_ROOT / "README.md").read_text()
    spelled = set(re.findall(r"`(casm_[a-z_]+)`", readme)) - {"casm_core"}
    assert spelled and spelled <= families, sorted(spelled - families)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples["casm_events_applied_total"]) == 10.0
    assert float(samples["casm_events_per_second"]) == pytest.approx(10.0)  # 10 events over 1 s
    assert float(samples['casm_recommendations_published_total{source="model"}']) == 1.0
    assert float(samples['casm_alpha{behaviour="buy"}']) == 0.25
    assert float(samples['casm_produce_sent_total{topic="recommendations"}']) == 3.0  # read at scrape time
    assert float(samples['casm_produce_failed_total{topic="recommendations"}']) == 1.0
    assert float(samples["casm_producer_rebuilds_total"]) == 1.0


def test_healthz_is_200_when_healthy_and_503_with_the_problems_when_not(served) -> None:
    address, _, health = served
    status, content_type, body = get(address + "/healthz")
    assert status == 200 and content_type == "application/json"
    assert json.loads(body) == {"status": "ok", "problems": []}

    health.problems = ["outputs cannot be delivered: broker unreachable", "behaviours[0] stopped"]
    status, content_type, body = get(address + "/healthz")
    assert status == 503 and content_type == "application/json"
    answer = json.loads(body)
    assert answer["status"] == "unhealthy" and answer["problems"] == health.problems

    health.problems = []  # healthy again: asked at every request, never cached
    assert get(address + "/healthz")[0] == 200
    assert health.calls == 3


def test_other_paths_are_not_found(served) -> None:
    address, _, health = served
    assert get(address + "/nothing")[0] == 404 and health.calls == 0


def test_the_events_rate_needs_no_producer_watched() -> None:
    metrics = ServiceMetrics(RATE_WINDOW_S)  # no watch_delivery: a service without outputs yet
    metrics.count_applied(4, now=0.0)
    metrics.count_applied(4, now=2.0)
    assert metrics.registry.get_sample_value("casm_events_per_second") == pytest.approx(4.0)
