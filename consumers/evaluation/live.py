"""Running the production path end to end: a `casm serve` process, a replay of events into
`behaviours`, and a monitor that reads `behaviours` and `recommendations` back to score what users
were sent. `casm demo` and `casm evaluate-stream` are built on `run_live`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm.auto import tqdm

from consumers.evaluation.prequential import PrequentialScorer
from consumers.settings import CasmSettings
from stream.clients import make_consumer, make_producer, topic_partitions
from stream.replay import Pacing, ReplayReport, replay

log = logging.getLogger(__name__)

# Polling the service and the topics: short enough to follow progress, long enough not to spin.
HTTP_TIMEOUT_S = 2.0  # /healthz and /metrics answer in milliseconds; longer means not up (yet)
ASSIGN_CHECK_S = 0.25  # between two /healthz probes while the service joins its group
METADATA_TIMEOUT_S = 30.0  # for the topics' partitions to show in the cluster metadata
MONITOR_POLL_MS = 100  # one monitor poll while following the run
FINAL_POLL_MS = 500  # the last monitor poll after the service stopped
MONITOR_POLL_RECORDS = 5_000  # records one monitor poll returns at most: progress shows between polls
PROGRESS_REFRESH_S = 0.5  # tqdm redraws the live bar at most this often (less terminal traffic)
RATE_MIN_SPAN_S = 1e-9  # events/s over a window: guards the division when two samples coincide


def settings_env(settings: CasmSettings) -> dict[str, str]:
    """`settings` as ``CASM_*`` environment variables (one JSON value per section), so a child
    process sees exactly these settings."""
    data = settings.model_dump(mode="json")
    if settings.kafka.sasl_password is not None:
        data["kafka"]["sasl_password"] = settings.kafka.sasl_password.get_secret_value()
    env = {}
    for key, value in data.items():
        if value is None:
            continue
        env[f"CASM_{key.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


class ServeProcess:
    """`casm serve` as a child process with the given settings; `stop()` sends SIGTERM (a clean
    shutdown) and returns its final report."""

    def __init__(self, settings: CasmSettings, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASM_")}
        env.update(settings_env(settings))
        self.metrics_url = f"http://{settings.serve.metrics_host}:{settings.serve.metrics_port}"
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "consumers.cli", "serve", "--json", "--no-create-topics"],
            env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.log_path = log_path

    def health(self) -> dict[str, Any] | None:
        """The service's /healthz answer, or None while it does not answer."""
        try:
            with urllib.request.urlopen(self.metrics_url + "/healthz", timeout=HTTP_TIMEOUT_S) as answer:
                return json.loads(answer.read())
        except (OSError, ValueError):
            return None

    def metrics(self) -> dict[str, float]:
        """The service's /metrics, each metric summed over its labels (empty when unreachable)."""
        try:
            with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=HTTP_TIMEOUT_S) as answer:
                text = answer.read().decode()
        except OSError:
            return {}
        totals: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                totals[name] = totals.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return totals

    def wait_assigned(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"casm serve exited with {self.process.returncode}; see {self.log_path}")
            health = self.health()
            if health and health.get("assigned"):
                return
            time.sleep(ASSIGN_CHECK_S)
        raise TimeoutError(f"casm serve got no partitions within {timeout_s} s; see {self.log_path}")

    def stop(self, timeout_s: float) -> dict[str, Any]:
        """SIGTERM, wait, and return the service's final report (empty if it had none)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("casm serve did not stop within %s s; killing it", timeout_s)
            self.process.kill()
            out, _ = self.process.communicate()
        self._log.close()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}


@dataclass
class MonitorState:
    """What the monitor saw on the topics."""

    events: int = 0
    recommendations: int = 0
    dead_letters: int = 0
    newest_event: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> (partition, offset)
    reflected: dict[str, tuple[int, int]] = field(default_factory=dict)  # user -> event of newest rec
    positions: dict[tuple[int, int], int] = field(default_factory=dict)  # (partition, offset) -> row
    user_events: Counter = field(default_factory=Counter)
    scores: list[dict[str, Any]] = field(default_factory=list)  # test-then-train ranks per event
    model_versions: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    timeline: list[dict[str, float]] = field(default_factory=list)

    def users_behind(self) -> int:
        """Users whose newest event is not yet reflected by a recommendation."""
        return sum(1 for user, event in self.newest_event.items() if self.reflected.get(user) != event)


class TopicMonitor:
    """Reads behaviours, recommendations and dead letters from the beginning (no group) and feeds
    the prequential scorer."""

    def __init__(self, settings: CasmSettings, bootstrap: str, scorer: PrequentialScorer) -> None:
        self.settings = settings
        self.scorer = scorer
        self.state = MonitorState()
        self.consumer = make_consumer(settings.kafka, bootstrap, group_id=None)
        topics = settings.topics
        names = [topics.behaviours, topics.recommendations, topics.dead_letters] + ([topics.scores] if topics.scores else [])
        partitions = [tp for topic in names for tp in topic_partitions(self.consumer, topic, timeout_s=METADATA_TIMEOUT_S)]
        self.consumer.assign(partitions)
        self.consumer.seek_to_beginning(*partitions)

    def poll(self, timeout_ms: int) -> int:
        """Read what arrived; returns the number of records."""
        topics = self.settings.topics
        count = 0
        for tp, records in self.consumer.poll(timeout_ms=timeout_ms, max_records=MONITOR_POLL_RECORDS).items():
            count += len(records)
            if tp.topic == topics.behaviours:
                self._events(tp.partition, records)
            elif tp.topic == topics.recommendations:
                self._recommendations(records)
            elif tp.topic == topics.scores:
                for record in records:
                    self.state.scores.extend(_score_rows(json.loads(record.value)))
            else:
                self.state.dead_letters += len(records)
        return count

    def _events(self, partition: int, records: list) -> None:
        for record in records:
            try:
                event = json.loads(record.value)
                user, item, behaviour = event["user_id"], event["item_id"], event["behavior"]
            except (ValueError, KeyError, TypeError):
                continue  # malformed: the service dead-letters it
            user = str(user)
            position = _row_of(event.get("event_id"), self.state.events)
            self.state.events += 1
            self.state.newest_event[user] = (partition, record.offset)
            self.state.positions[(partition, record.offset)] = position
            at = record.timestamp if self.scorer.clock == "wall" else record.offset
            history = self.state.user_events[user]
            self.state.user_events[user] += 1
            self.scorer.event(user, str(item), str(behaviour), at, position, history)

    def _recommendations(self, records: list) -> None:
        for record in records:
            rec = json.loads(record.value)
            user = rec["user_id"]
            self.state.recommendations += 1
            self.state.model_versions[rec["model_version"]] += 1
            self.state.sources[rec["source"]] += 1
            reflected = rec.get("event_offset")
            if reflected is not None:
                self.state.reflected[user] = (rec["event_partition"], reflected)
            at = record.timestamp if self.scorer.clock == "wall" else (-1 if reflected is None else reflected)
            self.scorer.recommendation(
                user, [i["item_id"] for i in rec["items"]], at, rec["model_version"], rec["source"],
                record.timestamp, rec.get("event_produced_ms"),
            )

    def close(self) -> None:
        self.consumer.close()


@dataclass
class LiveResult:
    """Outcome of `run_live`."""

    replay: dict[str, Any]
    serve: dict[str, Any]
    prequential: dict[str, Any]
    monitor: dict[str, Any]
    timeline: list[dict[str, float]]
    seconds: float
    drained: bool
    scores: list[dict[str, Any]]
    positions: dict[tuple[int, int], int]
    prequential_scorer: PrequentialScorer


def run_live(
    settings: CasmSettings,
    bootstrap: str,
    events: pa.Table,
    pacing: Pacing,
    run_dir: Path,
    source_name: str,
    progress: bool = True,
    produce_first: bool = False,
) -> LiveResult:
    """Start `casm serve`, replay `events` into behaviours at `pacing`, follow both topics until
    every user's newest event is reflected by a recommendation (or `live.drain_timeout_s` after
    the replay), stop the service cleanly, and score what was published. With `produce_first`
    the whole log is produced before the service starts, so what it consumes does not depend on
    how fast the producer is (full-speed evaluation)."""
    cfg = settings.live
    run_dir.mkdir(parents=True, exist_ok=True)
    scorer = PrequentialScorer(
        settings.behaviours.target, settings.serve.top_k, cfg.freshness_edges_ms, cfg.clock, cfg.grace_ms,
        history_per_user=cfg.lists_per_user,
    )
    started = time.monotonic()
    replay_result: dict[str, Any] = {}
    producer = make_producer(settings.kafka, bootstrap)

    def produce() -> None:
        report: ReplayReport = replay(events, producer, settings.topics.behaviours, pacing,
                                      source_name=source_name, progress=progress and produce_first)
        replay_result.update(report.to_dict())
        producer.close()

    sender = threading.Thread(target=produce, name="casm-replay", daemon=True)
    if produce_first:
        sender.start()
        sender.join()
    serve = ServeProcess(settings, run_dir / "serve.log")
    monitor = None
    drained = False
    try:
        serve.wait_assigned(cfg.start_timeout_s)
        monitor = TopicMonitor(settings, bootstrap, scorer)
        if not produce_first:
            sender.start()
        drained = _follow(monitor, serve, sender, events.num_rows, cfg, progress, started)
        sender.join()
    finally:
        serve_report = serve.stop(cfg.stop_timeout_s)
        if monitor is not None:
            monitor.poll(timeout_ms=FINAL_POLL_MS)
            monitor.close()
    scorer.flush()
    state = monitor.state if monitor else MonitorState()
    drained = drained if monitor else False
    return LiveResult(
        replay=replay_result,
        serve=serve_report,
        prequential=scorer.summary(cfg.window_events),
        monitor={
            "events_seen": state.events,
            "recommendations_seen": state.recommendations,
            "dead_letters_seen": state.dead_letters,
            "users": len(state.newest_event),
            "users_not_reflected": state.users_behind(),
            "model_versions": dict(state.model_versions),
            "sources": dict(state.sources),
        },
        timeline=state.timeline,
        seconds=time.monotonic() - started,
        drained=drained,
        scores=state.scores,
        positions=state.positions,
        prequential_scorer=scorer,
    )


def _score_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-event rows of one scores message (columns as arrays)."""
    columns = ("user_id", "item_id", "behavior", "partition", "offset", "produced_ms", "rank_full", "rank_sampled", "cold")
    shared = {k: batch[k] for k in ("model_version", "num_items", "num_sampled")}
    return [dict(zip(columns, values, strict=True), **shared) for values in zip(*(batch[c] for c in columns), strict=True)]


def _row_of(event_id: Any, fallback: int) -> int:
    """The replayed row of an event id ``"<source>:<row>"`` (the replay producer's), else `fallback`."""
    if isinstance(event_id, str):
        _, _, row = event_id.rpartition(":")
        if row.isdigit():
            return int(row)
    return fallback


def _follow(monitor: TopicMonitor, serve: ServeProcess, sender: threading.Thread, total: int,
            cfg, progress: bool, started: float) -> bool:
    """Poll the topics, show progress, sample a timeline; True when drained in time."""
    state = monitor.state
    bar = tqdm(total=total, unit="ev", desc="live", disable=not progress, mininterval=PROGRESS_REFRESH_S)
    last_sample = 0.0
    progress_mark, progress_at = (-1, -1), time.monotonic()
    window: list[tuple[float, int]] = []
    try:
        while True:
            monitor.poll(timeout_ms=MONITOR_POLL_MS)
            now = time.monotonic()
            monitor.scorer.flush(int(time.time() * 1000))
            bar.update(state.events - bar.n)
            if now - last_sample >= cfg.sample_every_s:
                last_sample = now
                window.append((now, state.events))
                window[:] = [w for w in window if w[0] >= now - cfg.rate_window_s]
                rate = (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], RATE_MIN_SPAN_S) if len(window) > 1 else 0.0
                summary = monitor.scorer.running(cfg.progress_recent_lists)
                health = serve.health() or {}
                metrics = serve.metrics()
                point = {
                    "t": round(now - started, 2),
                    "events": state.events,
                    "events_per_s": round(rate, 1),
                    "recommendations": state.recommendations,
                    "users_behind": state.users_behind(),
                    "freshness_p50_ms": summary.get("freshness_p50_ms", float("nan")),
                    "freshness_p99_ms": summary.get("freshness_p99_ms", float("nan")),
                    "hit_rate": summary.get(f"hr@{monitor.scorer.k}", float("nan")),
                    "model_version": float(health.get("model_version", float("nan"))),
                    "applied": metrics.get("casm_events_applied_total", float("nan")),
                    "lag": metrics.get("casm_consumer_lag", float("nan")),
                }
                state.timeline.append(point)
                bar.set_postfix({
                    "ev/s": f"{rate:.0f}",
                    "fresh p50/p99 ms": f"{point['freshness_p50_ms']:.0f}/{point['freshness_p99_ms']:.0f}",
                    f"hit@{monitor.scorer.k}": f"{point['hit_rate']:.3f}",
                    "model": health.get("model_version", "?"),
                })
            if serve.process.poll() is not None:
                log.error("casm serve exited early (code %s); see %s", serve.process.returncode, serve.log_path)
                return False
            if (state.events, state.recommendations) != progress_mark:
                progress_mark, progress_at = (state.events, state.recommendations), now
            if not sender.is_alive():
                if state.events >= total and state.users_behind() == 0:
                    return True
                if now - progress_at > cfg.drain_timeout_s:
                    log.warning("no progress for %s s with %d users' newest events not reflected",
                                cfg.drain_timeout_s, state.users_behind())
                    return False
    finally:
        bar.close()
