"""The dashboard's endpoints over real HTTP on a free port: `/` is one self-contained HTML page
(no URL to any other host), `/api/timeline` the timeline's JSON, both under a
Content-Security-Policy that keeps the browser on this origin; every chart of the page is there."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from consumers.serve.timeline import Timeline
from consumers.telemetry import CONTENT_SECURITY_POLICY, ServiceMetrics, TelemetryServer
from stream.broker import free_port

HOST = "127.0.0.1"
TIMEOUT_S = 30.0  # a loopback answer takes milliseconds; this only bounds a hung server
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
CHARTS = {"chart-events", "chart-lag", "chart-freshness", "chart-freshness-histogram", "chart-hr",
          "chart-model-version", "chart-alpha", "chart-dead-letters", "chart-trainer-steps", "chart-train-loss",
          "chart-outputs"}


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def dashboard() -> Iterator[tuple[str, Timeline]]:
    metrics = ServiceMetrics(10.0)
    metrics.watch_delivery(lambda: {"acknowledged": {"recommendations": 2}}, lambda: 0)
    timeline = Timeline(metrics, 0.5, 10, "recommendations")
    metrics.count_applied(5)
    timeline.sample()
    server = TelemetryServer(metrics, lambda: (True, {"status": "ok"}), HOST, free_port(HOST),
                             timeline=timeline.to_json).start()
    try:
        yield server.address, timeline
    finally:
        server.stop()


def test_page_is_self_contained_html_under_a_csp(dashboard: tuple[str, Timeline]) -> None:
    address, _ = dashboard
    status, headers, body = get(address + "/")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    page = body.decode()
    hosts = {m.group(1).lower() for m in re.finditer(r"https?://([^/\s\"'`<>:]+)", page)}
    assert hosts <= LOOPBACK, f"the page names other hosts: {hosts - LOOPBACK}"
    assert not re.search(r"https?://", page), "the page holds an absolute URL (it needs none: one origin)"
    assert not re.search(r"<(script|link|img|iframe)[^>]*\b(src|href)=", page), "the page loads a resource"
    assert "@import" not in page and "url(" not in page
    ids = set(re.findall(r'<figure class="chart" id="([^"]+)" data-points="0"', page))
    assert ids == CHARTS


def test_timeline_endpoint_serves_its_json(dashboard: tuple[str, Timeline]) -> None:
    address, timeline = dashboard
    status, headers, body = get(address + "/api/timeline")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    data = json.loads(body)
    assert data == json.loads(json.dumps(timeline.to_json()))
    assert data["points"] == 10 and len(data["series"]["events_per_s"]) == 1
    assert data["series"]["outputs_acknowledged"][0][1] == 2


def test_timeline_endpoint_since(dashboard: tuple[str, Timeline]) -> None:
    address, timeline = dashboard
    now = json.loads(get(address + "/api/timeline")[2])["now"]
    status, _, body = get(f"{address}/api/timeline?since={now}")
    assert status == 200
    data = json.loads(body)
    assert data["since"] == now and data["series"]["events_per_s"] == []
    assert data == json.loads(json.dumps(timeline.to_json(now)))
    for bad in ("x", "nan", "inf", "", "1&since=2"):
        status, headers, body = get(f"{address}/api/timeline?since={bad}")
        assert status == 400 and headers["Content-Type"] == "application/json", bad
        assert "since must be one finite number" in json.loads(body)["error"]


def test_timeline_endpoint_is_absent_without_a_timeline() -> None:
    server = TelemetryServer(ServiceMetrics(10.0), lambda: (True, {}), HOST, free_port(HOST)).start()
    try:
        assert get(server.address + "/api/timeline")[0] == 404
        assert get(server.address + "/")[0] == 200
        assert get(server.address + "/nothing")[0] == 404
    finally:
        server.stop()
