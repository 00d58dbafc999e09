"""`casm serve`: events in on `behaviours`, fresh top-K out on `recommendations`, the model
learning all the while.

Two stages on two threads, with a bounded queue between them (`serve.apply_queue_batches`):

1. polling (this thread, the only one that touches the Kafka consumer): poll a batch of
   `behaviours` and decode and validate it once (`stream.decode`: the valid events as columns, a
   dead letter with its reason for every other record); queue it.
2. applying (`apply_stage`, the only writer of state): deliver the dead letters, capture the
   test-then-train view of the batch (`signals`), apply the valid events *and the offsets
   consumed* to the store in one transaction (several queued polls at once under a backlog).
   After a crash Kafka redelivers from the store's offsets and the store drops what it already
   holds, so every event counts exactly once. Then hand the touched users and the batch's
   signals to the publisher (`publisher`, its own thread): it scores the users with the current
   model and publishes one `Recommendation` each, keyed by user, carrying the model version and
   the newest event it reflects; it ranks the batch's events and watches for drift.
3. training: the trainer process (`training`) gets the newest windows of the touched users
   every `feed_every_s` / `feed_every_events`, trains within its CPU budget on a replay mix of
   them and a reservoir of older users, and sends back model versions; each is swapped in by the
   applying stage, registered (with the alpha it trained with) and checkpointed. Ingestion never
   waits for training, except in the `deterministic` mode of evaluation runs, where a round of a
   fixed number of steps follows every `deterministic_round_events` events and both stages run
   inline on this thread.

Scale-out (`scale.role`, README "Scale-out"): `ingest` writes each batch to the changelog before
its commit, restores and releases partitions at rebalances (`partition_state`) and serves the
versions of the models topic (`model_follower`, in place of the trainer link); `trainer` reads the
changelog instead of `behaviours`, trains, watches drift and publishes each version
(`model_publisher`), but publishes no lists. Every role publishes its status (`status`).

On SIGINT/SIGTERM the loop finishes the batch in hand, publishes what is pending, commits,
collects the trainer's last version (each version is checkpointed) and closes. A restart finds users
whose newest event has no published list in the store and refreshes them first.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from kafka.errors import OffsetOutOfRangeError
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers.adapt.signals import SignalWatch
from consumers.serve.apply_stage import AppliedTotals, ApplyStage, DecodedBatch
from consumers.serve.changelog_writer import ChangelogWriter
from consumers.serve.model_follower import ModelFollower
from consumers.serve.model_publisher import PublishingModel
from consumers.serve.offset_guard import OffsetGuard
from consumers.serve.partition_state import PartitionStates
from consumers.serve.published_hits import PublishedHits
from consumers.serve.publisher import Publisher
from consumers.serve.serving_model import ServingModel
from consumers.serve.status import InstanceStatus, StatusReporter, instance_id, lag_by_key
from consumers.serve.timeline import Timeline
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics, TelemetryServer
from consumers.training.link import TrainerLink
from state.store import StateStore
from stream.changelog import ChangelogDecoder
from stream.clients import caught_up, commit_offsets, lag, make_consumer, make_producer
from stream.deadletters import DeadLetterPublisher
from stream.decode import EventValidator, decode_behaviours
from stream.delivery import acknowledged_producer

log = logging.getLogger(__name__)

# Closing after a failed start, and the trainer and producer at shutdown: the work that matters
# (the trainer's last version, every pending output) was waited for before, with its own settings.
CLOSE_AFTER_FAILED_START_S = 1.0
CLOSE_TIMEOUT_S = 5.0


def trainer_group(settings: CasmSettings) -> str:
    """The consumer group of the trainer role (its own: it reads every changelog partition)."""
    return f"{settings.kafka.group_id}.trainer"


def open_store(settings: CasmSettings, read_only: bool = False) -> StateStore:
    """The state store configured by `settings`."""
    return StateStore.from_config(
        settings.store,
        behaviours=settings.behaviours.names,
        open_vocabulary=settings.events.open_vocabulary,
        max_id_length=settings.events.max_id_length,
        read_only=read_only,
    )


@dataclass
class ServiceReport(AppliedTotals):
    """What a run of the service did (the applying stage counts events, duplicates and dead letters)."""

    recommendations: int = 0
    popularity_fallbacks: int = 0
    model_version: int = 0
    fine_tunes: int = 0
    seconds: float = 0.0
    stopped_by: str = ""
    offsets: dict[str, int] = field(default_factory=dict)
    events_scored: int = 0
    alpha: dict[str, float] = field(default_factory=dict)
    drift: list[dict[str, Any]] = field(default_factory=list)
    training: list[dict[str, Any]] = field(default_factory=list)  # one row per model version
    trainer_errors: int = 0


class Service:
    """The serving loop. Build it, then `run()`; `stop()` (or SIGINT/SIGTERM) ends it cleanly.
    `step()` runs one iteration, with the publisher's work inline (for tests)."""

    def __init__(self, settings: CasmSettings, bootstrap: str) -> None:
        self.settings = settings
        self.cfg = settings.serve
        self.topics = settings.topics
        self._stop = threading.Event()
        self.stopped_by = ""
        self.metrics = ServiceMetrics(self.cfg.metrics_rate_window_s)
        self.report = ServiceReport()
        self._alpha_lock = threading.Lock()
        self.store: StateStore | None = None
        self.trainer: TrainerLink | None = None
        try:
            if self.cfg.scoring_threads:
                torch.set_num_threads(self.cfg.scoring_threads)
            self.store = open_store(settings)
            self.validator = EventValidator(
                settings.events, None if settings.events.open_vocabulary else settings.behaviours.names
            )
            self._last_poll = self._last_records = time.monotonic()
            self._held: list = []  # deterministic mode: polled records not applied yet
            self.role = settings.scale.role
            # Every produce is tracked to its acknowledgement (stream.delivery).
            self.producer = acknowledged_producer(settings.kafka, bootstrap, make_producer)
            self.metrics.watch_delivery(self.producer.stats, lambda: self.producer.rebuilds)
            self.serving = (PublishingModel(settings, self.producer, self.store.item_ids, self.current_alpha)
                            if self.role == "trainer" else ServingModel(settings))
            self.trainer = (ModelFollower(settings, bootstrap, self.serving, self.metrics) if self.role == "ingest" else
                            TrainerLink(settings, self.store, self.serving, self.metrics, self.current_alpha,
                                        self._on_similarity))
            version, self.alpha = self.trainer.initialize()
            self.report.model_version = version
            for name, value in self.alpha.items():
                self.metrics.alpha.labels(name).set(value)
            self.dead_letters = DeadLetterPublisher(self.producer, self.topics.dead_letters)
            self._generation = 0  # +1 at every rewind to the store's offsets (apply_stage)
            self._committed: dict[tuple[str, int], int] = {}
            self._assigned: list[str] = []  # "topic[partition]" as of the last assignment (for /healthz)
            # Scale-out: the trainer watches drift over every instance's events (it sees them all
            # in the changelog, scores them with the newest version and owns alpha).
            self.signals = (
                SignalWatch(settings, self.store, self.producer, self.metrics, self.set_alpha, self.current_alpha,
                            self.trainer.request_similarity)
                if settings.drift.enabled and self.role != "ingest" else None
            )
            # The published HR@K of the dashboard (no lists, no hit rate: the trainer role).
            self.hits = PublishedHits(self.cfg.hit_users) if self.role != "trainer" else None
            self.publisher = Publisher(settings, self.store, self.producer, self.serving, self.metrics, self.signals,
                                       lists=self.role != "trainer", hits=self.hits)
            self.changelog_writer = (ChangelogWriter(settings, self.producer, self.metrics)
                                     if self.role == "ingest" else None)
            self.stage = ApplyStage(settings, self.store, self.validator, self.dead_letters, self.metrics,
                                    self.publisher, self.serving, self.signals, self.trainer,
                                    self.store.stats()["events_applied"], self.report,
                                    changelog=self.changelog_writer, check_conflicts=self.role != "trainer")
            self.partition_states = (PartitionStates(settings, bootstrap, self.store, self.publisher, self.metrics)
                                     if self.role == "ingest" else None)
            self._changelog = ChangelogDecoder()  # trainer role: reset at every assignment and rewind
            if self.role != "trainer":
                self._requeue_unpublished()
            # The trainer reads the changelog in a group of its own; auto_offset_reset='none': the
            # client never resets an out-of-range offset by itself.
            self.source = self.topics.changelog if self.role == "trainer" else self.topics.behaviours
            self.consumer = make_consumer(settings.kafka, bootstrap, [self.source],
                                          group_id=trainer_group(settings) if self.role == "trainer" else None,
                                          on_assign=self._on_assign, on_revoke=self._on_revoke,
                                          auto_offset_reset="none")
            self.instance = instance_id(settings)
            self.status = StatusReporter(self.producer, self.topics.status, settings.scale.status_every_s,
                                         self._status_snapshot)
            self.offset_guard = OffsetGuard(self.consumer, self.store, settings.kafka.offset_out_of_range, self.metrics,
                                            before_reset=self._bridge_reset if self.changelog_writer is not None else None)
            self.timeline = Timeline(self.metrics, self.cfg.timeline_every_s, self.cfg.timeline_points,
                                     self.topics.recommendations, self.hits)
            self.telemetry: TelemetryServer | None = None
            if self.cfg.metrics_port is not None:
                self.telemetry = TelemetryServer(self.metrics, self.health, self.cfg.metrics_host, self.cfg.metrics_port,
                                                 timeline=self.timeline.to_json)
        except BaseException:
            if self.trainer is not None:
                self.trainer.terminate(CLOSE_AFTER_FAILED_START_S)
            if getattr(self, "producer", None) is not None:
                self.producer.close(0)
            if self.store is not None:
                self.store.close()
            raise

    # ------------------------------------------------------------------------------ start-up
    def _requeue_unpublished(self) -> None:
        """Users whose newest applied event has no published recommendation yet (the process
        stopped between applying and publishing) are refreshed first."""
        users = self.store.user_ids()
        if not users:
            return
        newest = self.store.sequences(users, width=1).last_offset
        published = self.store.registry.last_published(users)
        def reflected(user: str) -> int:
            offset = published.get(user, {}).get("event_offset")
            return -1 if offset is None else offset

        # != rather than <: after an offset reset (kafka.offset_out_of_range = reset-earliest) a
        # user's newest event can have a lower offset than the list published before the reset.
        behind = [user for user, offset in zip(users, newest.tolist(), strict=True) if reflected(user) != offset]
        if behind:
            log.info("%d users have applied events without a published recommendation: refreshing them", len(behind))
            self.publisher.touch(behind, time.monotonic())

    def _bridge_reset(self, topic: str, partition: int, to_offset: int) -> bool:
        """Ingest role, before an offset reset: the batches in hand applied (their records come
        first), then a reset forward written to the changelog (`ChangelogWriter.bridge`). A reset
        backward is refused: the changelog's readers would drop the new log's first offsets as
        repeats of the old one's."""
        if not self.stage.drain(self.cfg.worker_timeout_s):
            return False
        stored = self.store.offsets(topic).get(partition, 0)
        if to_offset < stored:
            log.error("%s[%d]: a reset backward (to %d from %d) cannot be carried by the changelog; replay the log "
                      "into fresh files instead", topic, partition, to_offset, stored)
            return False
        return to_offset == stored or self.changelog_writer.bridge(partition, stored, to_offset)

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        """Finish the batches in hand: their offsets are in the store before anyone reads them."""
        if not self.stage.drain(self.cfg.worker_timeout_s):
            log.warning("batches were still being applied at a revocation after %.0f s", self.cfg.worker_timeout_s)

    def _on_assign(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        self._on_revoke(partitions)  # (also at the first assignment: the queue is empty then)
        if self.partition_states is not None:
            self.partition_states.assigned([tp.partition for tp in partitions])
        if self.role == "trainer":
            self._changelog = ChangelogDecoder(self.store.all_offsets())
        stored = {}
        for tp in partitions:
            offset = self.store.offsets(tp.topic).get(tp.partition)
            if offset is not None:
                stored[tp] = offset
        self.offset_guard.assigned(partitions)
        self._assigned = sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions)
        log.info("assigned %s; resuming at stored offsets %s",
                 [f"{tp.topic}[{tp.partition}]" for tp in partitions],
                 {f"{tp.topic}[{tp.partition}]": o for tp, o in stored.items()})
        return stored

    # ---------------------------------------------------------------------------- the loop
    def stop(self, reason: str = "stop()") -> None:
        """Ask the loop to finish the batch in hand and shut down."""
        if not self._stop.is_set():
            self.stopped_by = reason
            self._stop.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.stop(signal.Signals(signum).name))

    def health(self) -> tuple[bool, dict[str, Any]]:
        age = time.monotonic() - self._last_poll
        delivering, delivery = self.producer.health()
        problems = list(self.offset_guard.problems)
        if not delivering:
            problems.append(delivery)
        if self.stage.held_back:
            problems.append(self.stage.held_back)
        ok = (age < self.cfg.health_max_poll_age_s and self.publisher.error is None and self.stage.error is None
              and not problems)
        return ok, {
            "status": "ok" if ok else "unhealthy",
            "problems": problems,
            "delivering": delivering,
            "last_poll_age_s": round(age, 3),
            **self.trainer.health(),
            "publisher_ok": self.publisher.error is None,
            **self.stage.describe(),
            "model_version": self.serving.version,
            # The loop's copy: kafka-python's consumer is not thread-safe, and this runs on the HTTP thread.
            "assigned": list(self._assigned),
        }

    def idle_s(self) -> float | None:
        """Seconds since the last record arrived, once partitions are assigned and read up to
        their high watermark and nothing is left to publish; None before that."""
        if (not self.consumer.assignment() or not caught_up(self.consumer) or self.stage.busy
                or self.publisher.pending or self._held or self.offset_guard.stopped or self.producer.backlog):
            return None
        return time.monotonic() - self._last_records

    def run(self, until: Callable[[Service], bool] | None = None) -> ServiceReport:
        """Serve until stopped (or until `until(self)` is true, checked after every iteration)."""
        started = time.monotonic()
        if self.telemetry:
            self.telemetry.start()
        self.timeline.start()  # its own thread: the loop may stay long in one call (see timeline.py)
        self.publisher.start()
        try:
            if self.trainer.deterministic:
                if not self.trainer.ready(wait_s=self.cfg.worker_timeout_s):
                    raise RuntimeError(f"trainer process not ready within {self.cfg.worker_timeout_s} s")
            elif self.cfg.apply_queue_batches > 0:
                self.stage.start()
            while not self._stop.is_set():
                self.step()
                if until is not None and until(self):
                    self.stop("until")
        finally:
            self._shutdown()
            self.report.seconds = time.monotonic() - started
            self.report.stopped_by = self.stopped_by
        return self.report

    def step(self) -> None:
        """One iteration: poll and decode a batch and queue it for the applying stage (which, when
        it has no thread of its own, runs here, as does the publisher's work)."""
        if self.publisher.error is not None:
            raise RuntimeError("the publisher thread failed") from self.publisher.error
        if self.stage.error is not None:
            raise RuntimeError("the apply stage failed") from self.stage.error
        if self.stage.rewind_wanted.is_set():
            self._rewind()
        try:
            records = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.settings.kafka.max_poll_records)
        except OffsetOutOfRangeError as exc:
            self.offset_guard.on_error(exc)
            records = {}
        self.offset_guard.check()
        self._last_poll = time.monotonic()
        flat = [record for batch in records.values() for record in batch]
        if flat:
            self._last_records = self._last_poll
        if self.trainer.deterministic:
            flat = self._fixed_batch(flat)
        if flat:
            self.stage.put(self._decode(flat))
        if not self.stage.threaded:
            self.stage.run_inline()
            self.stage.trainer_step(self._wait_publisher)
        if not self.publisher.threaded:
            self.publisher.work()
        self._update_lag()
        self._commit_applied()
        try:
            self.status.maybe_publish()
        except Exception:  # noqa: BLE001 - status is for operators; serving goes on
            log.exception("could not take this instance's status")

    def _status_snapshot(self) -> InstanceStatus:
        """What `casm status` shows of this instance (polling thread: it reads the consumer)."""
        return InstanceStatus(
            instance=self.instance, role=self.role, host=socket.gethostname(), pid=os.getpid(),
            partitions=sorted(tp.partition for tp in self.consumer.assignment()),
            lag=lag_by_key(lag(self.consumer)), model_version=self.serving.version,
            model_published_at=self.serving.published_at, model_loaded_at=self.serving.loaded_at,
            events_applied=self.stage.events_applied_total,
            events_restored=0 if self.partition_states is None else self.partition_states.events_restored,
        )

    def _decode(self, flat: list) -> DecodedBatch:
        """The polled records decoded and validated (the one pass of `stream.decode`); the
        trainer's changelog records decoded (`stream.changelog`)."""
        if self.role == "trainer":
            decoded = self._changelog.decode(flat)
            return DecodedBatch(flat, decoded.events, [], decoded.offsets, self._generation)
        events, dead = decode_behaviours(flat, self.validator)
        offsets: dict[tuple[str, int], int] = {}
        for record in flat:  # a partition's records are in offset order
            offsets[(record.topic, record.partition)] = record.offset + 1
        return DecodedBatch(flat, events, dead, offsets, self._generation)

    def _rewind(self) -> None:
        """A batch was held back (its dead letters were not acknowledged): every partition is
        read again from the store's offsets, and what was polled since is dropped."""
        stored = self.store.offsets(self.source)
        for tp in self.consumer.assignment():
            if tp.partition in stored:
                self.consumer.seek(tp, stored[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        if self.role == "trainer":
            self._changelog = ChangelogDecoder(self.store.all_offsets())
        self._held = []
        self._generation += 1
        self.stage.rewound()

    def _commit_applied(self) -> None:
        """Kafka's committed offsets are informational (monitoring tools); the store is the truth."""
        applied = self.stage.applied_offsets
        if applied and applied != self._committed:
            self._committed = applied
            self.consumer.commit_async({TopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                                        for (t, p), o in applied.items() if t == self.source})

    def _fixed_batch(self, polled: list) -> list:
        """Deterministic mode: batches of exactly `kafka.max_poll_records` records, cut where a
        training round is due (fewer only when the partitions are read to their end), so that
        what each batch holds does not depend on how the broker's fetches fell."""
        self._held.extend(polled)
        size = self.settings.kafka.max_poll_records
        if self.cfg.has_model:
            size = max(1, min(size, self.trainer.events_until_round()))
        if len(self._held) < size and not (self._held and caught_up(self.consumer)):
            return []
        batch, self._held = self._held[:size], self._held[size:]
        # In lockstep with the publisher: every list reflects the batch before, whatever the speed.
        self._wait_publisher()
        return batch

    def _wait_publisher(self) -> None:
        """Deterministic mode: wait until the publisher has sent every pending list."""
        if not self.publisher.wait_idle(self.cfg.worker_timeout_s):
            log.warning("the publisher did not finish within %.0f s (outputs undeliverable?): the lockstep "
                        "of the deterministic mode is broken for this batch", self.cfg.worker_timeout_s)

    # ----------------------------------------------------------------------------- alpha
    def _on_similarity(self, similarity) -> None:
        """Gradient similarities from the trainer go to the drift policy."""
        if self.signals is not None:
            self.signals.on_similarity(similarity)

    def current_alpha(self) -> dict[str, float]:
        """A copy of the alpha the next fine-tuning round uses (any thread)."""
        with self._alpha_lock:
            return dict(self.alpha)

    def set_alpha(self, alpha: dict[str, float], reason: str) -> dict[str, float]:
        """Use `alpha` from the next fine-tuning round on; recorded in the store's alpha history
        (any thread)."""
        with self._alpha_lock:
            old = dict(self.alpha)
            self.alpha = {**self.alpha, **alpha}
            current = dict(self.alpha)
        self.store.registry.record_alpha(time.time(), current, reason)
        for name, value in alpha.items():
            self.metrics.alpha.labels(name).set(value)
            if old.get(name) != value:
                self.metrics.alpha_changes.labels(name).inc()
        return old

    # --------------------------------------------------------------------------- the rest
    def _update_lag(self) -> None:
        for tp, behind in lag(self.consumer).items():
            if behind is not None:
                self.metrics.lag.labels(tp.topic, str(tp.partition)).set(behind)

    def _shutdown(self) -> None:
        log.info("shutting down (%s): publishing %d pending users and batches", self.stopped_by or "error",
                 self.publisher.pending)
        try:
            self.stage.close(timeout_s=self.cfg.worker_timeout_s)
            self.publisher.close(timeout_s=self.cfg.worker_timeout_s)
            try:
                self.status.publish_stopped(timeout_s=CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - status is for operators
                log.exception("could not publish the stopped status")
            if not self.producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000):
                log.warning("%d records were not acknowledged before shutdown (lists among them are sent "
                            "again at the next start)", self.producer.backlog)
            assigned = self.consumer.assignment()
            try:
                commit_offsets(self.consumer, {
                    TopicPartition(t, p): o for (t, p), o in self.store.all_offsets().items() if TopicPartition(t, p) in assigned
                })
            except Exception as exc:  # noqa: BLE001 - informational commit only
                log.debug("final commit failed: %s", exc)
            self.trainer.close()  # its last version is adopted and checkpointed
        finally:
            self.report.offsets = {f"{t}[{p}]": o for (t, p), o in self.store.all_offsets().items()}
            self.report.alpha = self.current_alpha()
            self.report.recommendations = self.publisher.recommendations
            self.report.popularity_fallbacks = self.publisher.popularity_fallbacks
            self.report.training = list(self.trainer.training_log)
            self.report.fine_tunes = self.trainer.versions_adopted
            self.report.model_version = max(self.report.model_version, self.serving.version)
            self.report.trainer_errors = self.trainer.errors
            if self.signals is not None:
                try:
                    self.signals.persist()
                except Exception:  # noqa: BLE001 - the shutdown goes on; the newest periodic save stands
                    log.exception("could not save the drift detectors' state")
                self.report.events_scored = self.signals.events_scored
                self.report.drift = list(self.signals.log)
            self.trainer.terminate(CLOSE_TIMEOUT_S)
            if self.partition_states is not None:
                self.partition_states.close()
            self.consumer.close()
            self.producer.close(timeout=CLOSE_TIMEOUT_S)
            self.store.close()
            self.timeline.stop()
            if self.telemetry:
                self.telemetry.stop()
