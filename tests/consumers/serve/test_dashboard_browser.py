"""The dashboard in a real headless browser during a short live run: a `Service` on the test
broker is fed a few thousand synthetic events (and a few malformed records); Chromium loads
``/`` from its telemetry port, runs the page's script against ``/api/timeline`` and dumps the
DOM. Every chart drew points, and every request the page made (Chromium's net log: requests
whose top frame is the dashboard) went to the loopback address.

Chromium is Debian's (`apt-get install -y chromium`, done by `.ci/run`); without it the test
skips, and fails under ``CI=true``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from consumers.serve.service import Service
from consumers.settings import CasmSettings
from stream.clients import make_producer
from stream.replay import parse_pacing, replay
from stream.synthetic import SyntheticConfig, generate
from stream.topics import ensure_topics
from tests.consumers.serve.test_dashboard_http import CHARTS
from tests.consumers.serve.test_service import service_settings

pytestmark = pytest.mark.integration

EVENTS = 3_000
RATE = "1500/s"  # two seconds of stream: several timeline samples see events arrive
FIRST_LISTS = 50  # users with an acknowledged list before the second half of the stream is sent
MALFORMED = 5  # records that are no event: the dead-letter chart has a reason to draw
SAMPLE_EVERY_S = 0.5
READY_TIMEOUT_S = 180.0  # the trainer process's start (torch import) and first version on a busy 2-core machine
BROWSER_TIMEOUT_S = 120.0
VIRTUAL_TIME_MS = 8_000  # the page fetches at load and every 2 s of (virtual) time
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    # The browser's own background requests (not the page's) resolve nowhere: the test never leaves the machine.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--run-all-compositor-stages-before-draw", f"--virtual-time-budget={VIRTUAL_TIME_MS}",
]


def chromium() -> str:
    """The chromium binary; skips without one (fails under CI=true)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return found


def live_settings(tmp_path: Path, kafka_config, topic_names) -> CasmSettings:
    """The service tests' settings, training continuously with a fast timeline and an HTTP port."""
    return service_settings(tmp_path, kafka_config, topic_names, metrics_port=0, timeline_every_s=SAMPLE_EVERY_S,
                            training="continuous", min_events_to_train=100, feed_every_s=0.5, publish_every_s=1.0,
                            refresh_max_delay_ms=50)


def dashboard_ready(data: dict) -> list[str]:
    """What the timeline still lacks for every chart to draw (empty: ready)."""
    def drawn(points: list) -> bool:
        return any(v is not None for _, v in points)

    series, keyed = data["series"], data["keyed"]
    missing = [name for name in ("events_per_s", "freshness_p99_s", "hr_published", "hr_popularity",
                                 "trainer_steps_per_s", "outputs_acknowledged") if not drawn(series[name])]
    missing += [name for name in ("lag", "alpha", "train_loss", "dead_letters")
                if not any(drawn(points) for points in keyed[name].values())]
    if not any(v for _, v in series["model_version"]):
        missing.append("model_version >= 1")
    if not any(v for _, v in series["trainer_steps_per_s"]):
        missing.append("trainer_steps_per_s > 0")
    return missing


def page_requests(net_log: dict) -> set[str]:
    """URLs of the requests whose top frame is a loopback page (what the dashboard asked for)."""
    urls, keys = {}, {}
    for event in net_log["events"]:
        params, source = event.get("params") or {}, event["source"]["id"]
        if "url" in params:
            urls.setdefault(source, params["url"])
        if "network_isolation_key" in params:
            keys.setdefault(source, params["network_isolation_key"])
    page = set()
    for source, key in keys.items():
        top_frame = key.split(" ")[0]
        if urlsplit(top_frame).hostname in LOOPBACK and source in urls:
            page.add(urls[source])
    return page


def test_every_chart_draws_from_loopback_only(kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path) -> None:
    browser = chromium()
    settings = live_settings(tmp_path, kafka_config, topic_names)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    service = Service(settings, kafka_bootstrap)
    runner = threading.Thread(target=service.run, name="test-service", daemon=True)
    runner.start()
    producer = make_producer(settings.kafka, kafka_bootstrap)
    try:
        stream = generate(SyntheticConfig(n_events=EVENTS, n_users=150, n_items=200, seed=5))
        for n in range(MALFORMED):
            producer.send(settings.topics.behaviours, key=f"bad{n}".encode(), value=b"{not json")
        # The first half, then the second once lists are out: its target events judge published lists.
        half = EVENTS // 2
        sent = replay(stream.events.slice(0, half), producer, settings.topics.behaviours, parse_pacing(rate=RATE),
                      progress=False, source_name="first").sent
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(service.hits) < FIRST_LISTS:
            assert runner.is_alive(), "the service stopped"
            assert time.monotonic() < deadline, f"only {len(service.hits)} users have a list"
            time.sleep(SAMPLE_EVERY_S)
        sent += replay(stream.events.slice(half), producer, settings.topics.behaviours, parse_pacing(rate=RATE),
                       progress=False, source_name="second").sent
        assert sent == EVENTS
        deadline = time.monotonic() + READY_TIMEOUT_S
        while missing := dashboard_ready(service.timeline.to_json()):
            assert runner.is_alive(), "the service stopped"
            assert time.monotonic() < deadline, f"the timeline lacks {missing} ({service.hits.totals()}, " \
                f"{len(service.hits)} lists)"
            time.sleep(SAMPLE_EVERY_S)

        net_log = tmp_path / "netlog.json"
        started = time.monotonic()
        answer = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", f"--log-net-log={net_log}",
             "--dump-dom", service.telemetry.address + "/"],
            capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, check=False)
        browsed_s = time.monotonic() - started
    finally:
        producer.close()
        service.stop("test")
        runner.join(60)
    assert answer.returncode == 0, answer.stderr[-2000:]
    drawn = {m.group(1): int(m.group(2))
             for m in re.finditer(r'<figure class="chart" id="([^"]+)" data-points="(\d+)"', answer.stdout)}
    assert set(drawn) == CHARTS, answer.stdout[-2000:]
    assert all(points > 0 for points in drawn.values()), (drawn, browsed_s)
    status = re.search(r'<div id="status">([^<]*)</div>', answer.stdout)
    assert status is not None and status.group(1).startswith("last sample"), status
    requested = page_requests(json.loads(net_log.read_text()))
    queries = {urlsplit(url).query for url in requested if urlsplit(url).path == "/api/timeline"}
    assert "" in queries, requested  # the whole history (once: the page holds it after),
    assert any(q.startswith("since=") for q in queries), requested  # then only what is new
    outside = {url for url in requested if urlsplit(url).hostname not in LOOPBACK}
    assert not outside, f"the page requested {outside}"
