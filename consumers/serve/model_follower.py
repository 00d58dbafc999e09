"""The ingest role's model (scale-out): versions come from the models topic, not from a trainer
process of its own.

A thread reads `topics.models` (one partition, no consumer group) from its beginning, assembles
each version (`stream.model_topic`) and swaps every version newer than the serving one into the
`ServingModel`, with the version's item vocabulary (serving translates indices:
`consumers.serve.item_space`). It stands where the service otherwise holds its `TrainerLink`: the
same calls, none of which trains.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kafka import TopicPartition

from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from stream.clients import make_consumer
from stream.model_topic import ModelAssembler, ModelRecordError

log = logging.getLogger(__name__)

#: Poll period of the models topic (ms): a new version is swapped in within about this long.
POLL_MS = 200
#: Back-off after the models topic could not be read (s).
RETRY_S = 2.0


class ModelFollower:
    """Loads published versions into `serving` on a thread of its own (`initialize` starts it)."""

    deterministic = False

    def __init__(self, settings: CasmSettings, bootstrap: str, serving: ServingModel, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.serving = serving
        self.metrics = metrics
        self.versions_adopted = 0
        self.errors = 0
        self.restarts = 0
        self.training_log: list[dict[str, Any]] = []  # the trainer's, not ours: empty
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # The calls of a TrainerLink, none of which trains here.
    def initialize(self) -> tuple[int, dict[str, float]]:
        """Start following; returns (0, the configured alpha): the trainer owns alpha."""
        self._thread = threading.Thread(target=self._follow, name="casm-model-follower", daemon=True)
        self._thread.start()
        return 0, dict(self.settings.behaviours.alpha)

    def ready(self, wait_s: float = 0.0) -> bool:
        return True

    def collect(self) -> None:
        """Versions are swapped in by the follower's thread as they arrive."""

    def round_due(self) -> bool:
        return False

    def events_until_round(self) -> int:
        return self.settings.kafka.max_poll_records

    def run_round(self, events_applied: int, steps: int | None = None) -> None:
        raise RuntimeError("an ingest instance does not train (scale.role = ingest)")

    def maybe_feed(self, events_applied: int) -> None:
        """Training sequences reach the trainer through the changelog."""

    def touched(self, users: list[str], applied: int) -> None:
        """(The trainer sees every applied event in the changelog.)"""

    def request_similarity(self) -> None:
        """(Drift is watched by the trainer.)"""

    def health(self) -> dict[str, Any]:
        return {"model_follower_alive": self._thread is not None and self._thread.is_alive(),
                "model_loaded_at": self.serving.loaded_at, "model_published_at": self.serving.published_at}

    def close(self) -> None:
        self.terminate(POLL_MS / 1000.0 * 5)

    def terminate(self, timeout_s: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # ------------------------------------------------------------------------------ the thread
    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self._read()
            except Exception:  # noqa: BLE001 - serving goes on with the version it has
                self.errors += 1
                log.exception("reading %s failed; retrying in %.0f s", self.settings.topics.models, RETRY_S)
                self._stop.wait(RETRY_S)

    def _read(self) -> None:
        consumer = make_consumer(self.settings.kafka, self.bootstrap, group_id=None)
        try:
            tp = TopicPartition(self.settings.topics.models, 0)
            consumer.assign([tp])
            consumer.seek(tp, self._newest_start(consumer, tp))
            assembler = ModelAssembler()
            while not self._stop.is_set():
                for record in consumer.poll(timeout_ms=POLL_MS).get(tp, []):
                    try:
                        version = assembler.add(record.headers, record.value)
                    except ModelRecordError as exc:
                        log.error("%s@%d skipped: %s", tp, record.offset, exc)
                        continue
                    if version is not None and version.version > self.serving.version:
                        self._swap(version)
        finally:
            consumer.close()

    def _newest_start(self, consumer, tp: TopicPartition) -> int:
        """Where the newest version's records begin (with one version's length of margin, for a
        chunk sent twice), so that a start does not read every version ever published; 0 when
        the topic is empty or its last record says nothing."""
        consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + self.settings.kafka.request_timeout_ms / 1000.0
        while (high := consumer.highwater(tp)) is None and time.monotonic() < deadline and not self._stop.is_set():
            consumer.poll(timeout_ms=POLL_MS, max_records=1)  # the first fetch tells the high watermark
        if not high:
            return 0
        consumer.seek(tp, high - 1)
        while time.monotonic() < deadline and not self._stop.is_set():
            for record in consumer.poll(timeout_ms=POLL_MS, max_records=1).get(tp, []):
                headers = dict(record.headers or [])
                try:
                    chunk, count = int(headers["model.chunk"]), int(headers["model.chunks"])
                except (KeyError, ValueError):
                    return 0
                return max(0, record.offset - chunk - count)
        return 0

    def _swap(self, published) -> None:
        meta = published.meta
        self.serving.load(published.version, published.weights, int(meta["num_items"]), meta["behaviours"],
                          alpha=meta.get("alpha"), item_ids=meta["item_ids"], published_at=meta.get("published_at"))
        self.versions_adopted += 1
        self.metrics.model_version.set(published.version)
        self.metrics.fine_tunes.inc()
        lag_s = None if meta.get("published_at") is None else time.time() - float(meta["published_at"])
        if lag_s is not None:
            self.metrics.model_publish_lag.set(lag_s)
        log.info("model version %d loaded from %s (%d items, %.1f MB; %s s after its publication)",
                 published.version, self.settings.topics.models, len(meta["item_ids"]),
                 published.payload_bytes / 1e6, "?" if lag_s is None else f"{lag_s:.2f}")
