"""Health and metrics of `casm serve` in the Prometheus text format, and its dashboard, on a
loopback HTTP port.

``GET /metrics`` serves the metrics, ``GET /healthz`` a JSON status (200 when the loop polled
recently, 503 otherwise), ``GET /api/timeline`` the service's bounded history as JSON (its schema
is in `consumers/serve/timeline.py`; 404 when the server was given none) and ``GET /`` the
dashboard: one self-contained HTML page (`dashboard.html`: inline CSS and JavaScript, charts
drawn as inline SVG, no external URL) that fetches /api/timeline every few seconds. Every answer
carries a Content-Security-Policy that lets the browser load nothing but this origin.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

DASHBOARD_PAGE = Path(__file__).with_name("dashboard.html")
#: The browser may load, run and style only what this server sends (inline script and style included).
CONTENT_SECURITY_POLICY = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'"
HTML_TYPE = "text/html; charset=utf-8"
JSON_TYPE = "application/json"

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """The service's metrics in their own registry (several services can share a process)."""

    def __init__(self, rate_window_s: float) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("casm_events_applied", "Behaviour events applied to the state store", registry=r)
        self.duplicates = Counter("casm_events_duplicate", "Redelivered events dropped as duplicates", registry=r)
        self.dead_letters = Counter(
            "casm_dead_letters", "Malformed messages sent to the dead-letter topic", ["kind"], registry=r
        )
        self.events_per_second = Gauge(
            "casm_events_per_second", "Applied events per second over the rate window", registry=r
        )
        self.apply_queue = Gauge("casm_apply_queue_batches", "Decoded polls waiting for the applying thread",
                                 registry=r)
        self.lag = Gauge("casm_consumer_lag", "High watermark minus position", ["topic", "partition"], registry=r)
        self.published = Counter("casm_recommendations_published", "Recommendations published", ["source"], registry=r)
        self.refresh_latency = Histogram(
            "casm_refresh_latency_seconds",
            "From a user's first unpublished event being applied to their recommendation being sent",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.freshness = Histogram(
            "casm_freshness_seconds",
            "From the event's produce time (Kafka record timestamp) to its recommendation being sent",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.batch_seconds = Histogram(
            "casm_ingest_batch_seconds", "Decode + validate + apply time of one polled batch",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.model_version = Gauge("casm_model_version", "Version of the model used for scoring", registry=r)
        self.fine_tunes = Counter("casm_fine_tunes", "Model versions adopted from the trainer", registry=r)
        self.fine_tune_seconds = Histogram(
            "casm_fine_tune_seconds", "Wall seconds of training behind one model version",
            buckets=LATENCY_BUCKETS_S, registry=r,
        )
        self.trainer_steps = Counter("casm_trainer_steps", "Optimisation steps of the trainer process", registry=r)
        self.trainer_steps_per_s = Gauge(
            "casm_trainer_steps_per_second", "Steps per second of the trainer over its last version", registry=r
        )
        self.trainer_errors = Counter("casm_trainer_errors", "Failed trainer steps and trainer deaths", registry=r)
        self.trainer_restarts = Counter("casm_trainer_restarts", "Trainer processes restarted", registry=r)
        self.gradient_similarity_seconds = Histogram(
            "casm_gradient_similarity_seconds", "Duration of one gradient-similarity measurement in the trainer",
            registry=r,
        )
        self.train_loss = Gauge("casm_train_loss", "Weighted BCE of the newest model version's steps", registry=r)
        self.train_loss_by_behaviour = Gauge(
            "casm_train_loss_by_behaviour", "Mean loss at positions whose target has this behaviour",
            ["behaviour"], registry=r,
        )
        self.alpha = Gauge("casm_alpha", "Current alpha_b of the weighted BCE", ["behaviour"], registry=r)
        self.alpha_changes = Counter("casm_alpha_changes", "Changes of alpha_b", ["behaviour"], registry=r)
        self.drifts = Counter(
            "casm_drift_detections", "Drift detections", ["behaviour", "signal", "detector"], registry=r
        )
        # --- delivery and offsets (issue 13) ---
        self.publish_failed = Counter(
            "casm_recommendations_failed", "Recommendations the producer gave up on (the user is refreshed "
            "again)", registry=r,
        )
        self.dead_letter_holds = Counter(
            "casm_dead_letter_holds", "Batches held back (not applied, read again) because a dead letter "
            "was not acknowledged", registry=r,
        )
        self.offset_out_of_range = Gauge(
            "casm_offset_out_of_range", "1 while a partition is stopped because its stored offset is outside "
            "the partition's log", ["topic", "partition"], registry=r,
        )
        self.offset_resets = Counter(
            "casm_offset_resets", "Partitions re-read from their log start after an out-of-range offset "
            "(offset_out_of_range = reset-earliest)", ["topic", "partition"], registry=r,
        )
        self.conflicting_duplicates = Counter(
            "casm_events_conflicting_duplicate", "Events with a known event_id but different content (sent "
            "to the dead-letter topic)", registry=r,
        )
        self.changelog_records = Counter(
            "casm_changelog_records", "Changelog records acknowledged (scale-out, ingest role)", registry=r)
        self.changelog_bytes = Counter(
            "casm_changelog_bytes", "Bytes of acknowledged changelog records (values)", registry=r)
        self.restored_events = Counter(
            "casm_restored_events", "Events restored from the changelog at assignments", ["partition"], registry=r)
        self.restore_seconds = Histogram(
            "casm_restore_seconds", "Wall seconds to bring an assignment's partitions up to their changelog",
            registry=r, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.released_partitions = Counter(
            "casm_released_partitions", "Partitions whose state was released after they moved away", registry=r)
        self.changelog_gaps = Counter(
            "casm_changelog_gaps", "Partitions restored from the changelog's start because the file was not a prefix "
            "of their changelog (a zombie's commit)", registry=r)
        self.model_publish_lag = Gauge(
            "casm_model_load_lag_seconds", "Seconds from a version's publication to its swap here", registry=r)
        self._window_s = rate_window_s
        self._delivery: Callable[[], dict[str, dict[str, int]]] | None = None
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic s, events) within the rate window

    def watch_delivery(self, stats: Callable[[], dict[str, dict[str, int]]],
                       rebuilds: Callable[[], int]) -> None:
        """Export a producer's counts (`stats()`: sent / acknowledged / failed / given_up per topic)
        as ``casm_produce_<count>_total{topic}`` and its rebuilds as ``casm_producer_rebuilds_total``."""
        self._delivery = stats
        self.registry.register(_DeliveryCollector(stats, rebuilds))

    def delivery_stats(self) -> dict[str, dict[str, int]]:
        """The watched producer's counts (count -> topic -> records); empty when none is watched."""
        return self._delivery() if self._delivery is not None else {}

    def count_applied(self, n: int, now: float | None = None) -> None:
        """Record `n` applied events and update the events/s gauge."""
        now = time.monotonic() if now is None else now
        self.events.inc(n)
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        span = max(now - self._recent[0][0], 1e-9) if len(self._recent) > 1 else self._window_s
        self.events_per_second.set(sum(c for _, c in self._recent) / max(span, 1e-3))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _DeliveryCollector:
    """Reads the producer's counts at scrape time."""

    HELP = {
        "sent": "Records handed to the producer (each attempt)",
        "acknowledged": "Records the broker acknowledged",
        "failed": "Sends that failed (each attempt; retried with backoff)",
        "given_up": "Records not delivered after every retry",
    }

    def __init__(self, stats: Callable[[], dict[str, dict[str, int]]], rebuilds: Callable[[], int]) -> None:
        self.stats = stats
        self.rebuilds = rebuilds

    def describe(self) -> list:
        return []

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        stats = self.stats()
        for name, help_text in self.HELP.items():
            family = CounterMetricFamily(f"casm_produce_{name}", help_text, labels=["topic"])
            for topic, value in sorted(stats.get(name, {}).items()):
                family.add_metric([topic], value)
            yield family
        yield CounterMetricFamily("casm_producer_rebuilds", "Producers closed and rebuilt after they could "
                                  "not deliver", value=self.rebuilds())


def timeline_since(query: str) -> float | None:
    """The ``since`` (unix s) of an /api/timeline query string, None when absent.

    Raises:
        ValueError: ``since`` given but not one finite number.
    """
    values = parse_qs(query, keep_blank_values=True).get("since")
    if values is None:
        return None
    try:
        since = float(values[-1]) if len(values) == 1 else math.nan
    except ValueError:
        since = math.nan
    if not math.isfinite(since):
        raise ValueError(f"since must be one finite number of unix seconds, not {values}")
    return since


class TelemetryServer:
    """HTTP server on its own thread: /metrics, /healthz, /api/timeline and the dashboard (/).
    `timeline(since)` returns the history (after unix s `since`, all of it for None) as plain
    JSON values (the service's `Timeline.to_json`)."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        host: str,
        port: int,
        timeline: Callable[[float | None], dict[str, Any]] | None = None,
    ) -> None:
        metrics_ref, health_ref, timeline_ref = metrics, health, timeline
        page = DASHBOARD_PAGE.read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                path, _, query = self.path.partition("?")
                if path.startswith("/metrics"):
                    body, status, ctype = metrics_ref.render(), 200, CONTENT_TYPE_LATEST
                elif path.startswith("/healthz"):
                    ok, details = health_ref()
                    body, status, ctype = json.dumps(details).encode(), 200 if ok else 503, JSON_TYPE
                elif path == "/api/timeline" and timeline_ref is not None:
                    try:
                        since = timeline_since(query)
                    except ValueError as exc:
                        body, status, ctype = json.dumps({"error": str(exc)}).encode(), 400, JSON_TYPE
                    else:
                        body = json.dumps(timeline_ref(since), separators=(",", ":")).encode()
                        status, ctype = 200, JSON_TYPE
                elif path in ("/", "/index.html"):
                    body, status, ctype = page, 200, HTML_TYPE
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("telemetry: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="casm-telemetry", daemon=True)

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> TelemetryServer:
        self._thread.start()
        log.info("dashboard at %s/, metrics at %s/metrics, health at %s/healthz", self.address, self.address,
                 self.address)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
