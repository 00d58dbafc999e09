"""`casm serve`: events in on `behaviours`, fresh top-K out on `recommendations`, the model
learning all the while.

One loop, one thread, owns the state store (DuckDB has one writer) and the Kafka clients:

1. poll a batch of `behaviours`; decode and validate it (malformed messages go to the dead-letter
   topic with their reason); apply the valid events *and the offsets consumed* to the store in one
   transaction. After a crash Kafka redelivers from the store's offsets and the store drops what it
   already holds, so every event counts exactly once.
2. refresh the users touched since their last recommendation, in micro-batches bounded in size and
   delay: score every known item with the current model, publish one `Recommendation` per user
   (keyed by user, carrying the model version and the newest event it reflects) and remember it.
3. fine-tune: every N events or T seconds a sample of sequences goes to the trainer process
   (`training_worker`), which trains its own copy with the weighted BCE and the current alpha and
   sends back the weights; the loop swaps them in between two batches, registers the version and
   checkpoints. Ingestion never waits for training.

On SIGINT/SIGTERM the loop finishes the batch in hand, publishes what is pending, commits,
checkpoints and closes.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casm_core.config import BehaviourConfig
from casm_core.model import CASM
from casm_core.scoring import Scorer, items_with_behaviours
from consumers.drift import DriftMonitor
from consumers.event_scoring import EventScores, score_events
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics, TelemetryServer
from consumers.training_worker import FineTuneJob, TrainedVersion, TrainingWorker, WorkerInit
from state.store import StateStore
from stream.clients import caught_up, lag, make_consumer, make_producer
from stream.deadletters import DeadLetterPublisher
from stream.decode import EventValidator, decode_behaviours

log = logging.getLogger(__name__)


def open_store(settings: CasmSettings, read_only: bool = False) -> StateStore:
    """The state store configured by `settings`."""
    return StateStore.from_config(
        settings.store,
        behaviours=settings.behaviours.names,
        open_vocabulary=settings.events.open_vocabulary,
        max_id_length=settings.events.max_id_length,
        min_timestamp=settings.events.min_timestamp,
        max_future_skew_s=settings.events.max_future_skew_s,
        read_only=read_only,
    )


@dataclass
class ServiceReport:
    """What a run of the service did."""

    events_applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0
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


class ScoringModel:
    """The serving copy of the model: weights of one version and a Scorer over them."""

    def __init__(self, settings: CasmSettings, behaviours: Sequence[str]) -> None:
        self.model_cfg = settings.model
        self.target = BehaviourConfig.model_validate(settings.behaviours.model_dump()).target_index()
        self.version = 0
        self.scorer: Scorer | None = None
        self._behaviours = list(behaviours)

    def load(self, version: int, weights: dict[str, np.ndarray], num_items: int, behaviours: Sequence[str]) -> None:
        """Swap in the weights of `version` (built aside, then one assignment)."""
        model = CASM(self.model_cfg, num_items, len(behaviours))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        self.scorer = Scorer(model, self.target)
        self.version = version
        self._behaviours = list(behaviours)

    @property
    def num_items(self) -> int:
        return 0 if self.scorer is None else self.scorer.num_items


class Service:
    """The serving loop. Build it, then `run()`; `stop()` (or SIGINT/SIGTERM) ends it cleanly."""

    def __init__(self, settings: CasmSettings, bootstrap: str) -> None:
        self.settings = settings
        self.cfg = settings.serve
        self.bootstrap = bootstrap
        self.topics = settings.topics
        self._stop = threading.Event()
        self.stopped_by = ""
        self.metrics = ServiceMetrics(self.cfg.metrics_rate_window_s)
        self.report = ServiceReport()
        # Started first: the trainer process imports torch while the store opens and the group joins.
        self.worker = TrainingWorker()
        try:
            if self.cfg.scoring_threads:
                torch.set_num_threads(self.cfg.scoring_threads)
            self.store = open_store(settings)
            self.validator = EventValidator(
                settings.events, None if settings.events.open_vocabulary else settings.behaviours.names
            )
            self._pending: OrderedDict[str, float] = OrderedDict()  # user -> when first left unpublished
            self._events_since_training = 0
            self._events_applied_total = self.store.stats()["events_applied"]
            self._last_training = time.monotonic()
            self._last_poll = time.monotonic()
            self._last_records = time.monotonic()
            self._trainer_item_count = 0
            self._popular: list[str] = []
            self._popular_scores: list[float] = []
            self._popular_at = -float("inf")
            self._item_id_cache: list[str] = []
            self._unrecorded: dict[str, tuple[list[str], int, float, int]] = {}  # user -> (items, version, at, offset)
            self._recorded_at = time.monotonic()
            self._retained_at = time.monotonic()
            self.scoring = ScoringModel(settings, self.store.behaviour_names())
            self.drift = DriftMonitor(settings.drift, settings.behaviours.target) if settings.drift.enabled else None
            self._score_rng = np.random.default_rng(settings.drift.seed)
            self._initialize_worker()
            self._requeue_unpublished()
            self.producer = make_producer(settings.kafka, bootstrap)
            self.dead_letters = DeadLetterPublisher(self.producer, self.topics.dead_letters)
            self.consumer = make_consumer(
                settings.kafka, bootstrap, [self.topics.behaviours], on_assign=self._on_assign
            )
            self.telemetry: TelemetryServer | None = None
            if self.cfg.metrics_port is not None:
                self.telemetry = TelemetryServer(self.metrics, self.health, self.cfg.metrics_host, self.cfg.metrics_port)
        except BaseException:
            self.worker.close(timeout_s=1.0)
            raise

    # ------------------------------------------------------------------------------ start-up
    def _initialize_worker(self) -> None:
        """Build the trainer from the newest registered checkpoint, an offline one, or scratch."""
        item_ids = self.store.item_ids()
        behaviours = self.settings.behaviours.model_dump()
        behaviours["names"] = self.store.behaviour_names()
        checkpoint, version = None, 0
        latest = self.store.latest_model()
        if latest and Path(latest["checkpoint_path"]).exists():
            checkpoint, version = latest["checkpoint_path"], int(latest["version"])
            behaviours["alpha"] = {**behaviours["alpha"], **latest["alpha"]}
            log.info("resuming from model version %d (%s)", version, checkpoint)
        elif latest:
            version = int(latest["version"])
            log.warning("checkpoint of model version %d is missing (%s); training from scratch",
                        version, latest["checkpoint_path"])
        elif self.cfg.initial_checkpoint is not None:
            checkpoint = str(self.cfg.initial_checkpoint)
            log.info("starting from the offline checkpoint %s", checkpoint)
        else:
            log.info("no model yet: the model learns from the stream (popularity until the first version)")
        history = self.store.alpha_history()
        if history:
            behaviours["alpha"] = {**behaviours["alpha"], **history[-1]["alpha"]}
        init = WorkerInit(
            model_config=self.settings.model.model_dump(),
            train_config=self.settings.train.model_dump(),
            behaviours=behaviours,
            item_ids=item_ids,
            device=str(self.settings.device),
            threads=self.cfg.trainer_threads,
            checkpoint=checkpoint,
        )
        self.worker.initialize(init)
        self._trainer_item_count = len(item_ids)
        self._initial_version = version if checkpoint is not None else None
        self._initial_behaviours = list(behaviours["names"])
        self.alpha = dict(behaviours["alpha"])
        self.report.model_version = version
        self._next_version = version + 1
        for name, value in self.alpha.items():
            self.metrics.alpha.labels(name).set(value)

    def _requeue_unpublished(self) -> None:
        """Users whose newest applied event has no published recommendation yet (the process
        stopped between applying and publishing) are refreshed first."""
        users = self.store.user_ids()
        if not users:
            return
        newest = self.store.sequences(users, width=1).last_offset
        published = self.store.last_published(users)
        now = time.monotonic()
        for user, offset in zip(users, newest.tolist(), strict=True):
            reflected = published.get(user, {}).get("event_offset")
            if reflected is None or reflected < offset:
                self._pending[user] = now
        if self._pending:
            log.info("%d users have applied events without a published recommendation: refreshing them",
                     len(self._pending))

    def _on_assign(self, partitions: list) -> dict:
        stored = {}
        for tp in partitions:
            offset = self.store.offsets(tp.topic).get(tp.partition)
            if offset is not None:
                stored[tp] = offset
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
        ok = age < self.cfg.health_max_poll_age_s and self.worker.alive
        return ok, {
            "status": "ok" if ok else "unhealthy",
            "last_poll_age_s": round(age, 3),
            "trainer_alive": self.worker.alive,
            "trainer_ready": self.worker.ready,
            "model_version": self.scoring.version,
            "assigned": sorted(f"{tp.topic}[{tp.partition}]" for tp in self.consumer.assignment()),
        }

    def idle_s(self) -> float | None:
        """Seconds since the last record arrived, once partitions are assigned and read up to
        their high watermark; None while not caught up (joining the group, or behind)."""
        if not self.consumer.assignment() or not caught_up(self.consumer):
            return None
        return time.monotonic() - self._last_records

    def run(self, until: Callable[[Service], bool] | None = None) -> ServiceReport:
        """Serve until stopped (or until `until(self)` is true, checked after every iteration)."""
        started = time.monotonic()
        if self.telemetry:
            self.telemetry.start()
        try:
            if self.cfg.synchronous_training and not self._worker_ready(wait_s=self.cfg.worker_timeout_s):
                raise RuntimeError(f"trainer process not ready within {self.cfg.worker_timeout_s} s")
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
        """One iteration: ingest a batch, refresh, swap in a trained model, start training."""
        records = self.consumer.poll(timeout_ms=self.cfg.poll_timeout_ms, max_records=self.settings.kafka.max_poll_records)
        self._last_poll = time.monotonic()
        if records:
            self._last_records = self._last_poll
            self._ingest(records)
        self._refresh(force=False)
        if self._worker_ready():
            self._collect_trained()
            self._maybe_fine_tune()
        self._update_lag()
        if time.monotonic() - self._retained_at >= self.cfg.retain_every_s:
            self._retained_at = time.monotonic()
            trimmed = self.store.retain()
            if trimmed:
                log.info("retention trimmed %d applied events", trimmed)

    def _ingest(self, records: dict) -> None:
        started = time.perf_counter()
        flat = [record for batch in records.values() for record in batch]
        events, dead = decode_behaviours(flat, self.validator)
        if dead:
            self.dead_letters.publish(dead)
            for letter in dead:
                self.metrics.dead_letters.labels(letter.kind).inc()
            self.report.dead_letters += len(dead)
        offsets = {(tp.topic, tp.partition): batch[-1].offset + 1 for tp, batch in records.items() if batch}
        fresh = self._not_yet_applied(events)
        scored = self._score_events(events, fresh) if self.drift is not None else None
        result = self.store.apply(events, offsets)
        now = time.monotonic()
        for user in result.touched_users:
            self._pending.setdefault(user, now)
        self._events_since_training += result.applied
        self._events_applied_total += result.applied
        self.report.events_applied += result.applied
        self.report.duplicates += result.duplicates
        self.metrics.count_applied(result.applied)
        if result.duplicates:
            self.metrics.duplicates.inc(result.duplicates)
        if self.drift is not None:
            self._watch_drift(events, fresh, scored)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        # Kafka's committed offsets are informational (monitoring tools); the store is the truth.
        self.consumer.commit_async(
            {tp: _offset_and_metadata(batch[-1].offset + 1) for tp, batch in records.items() if batch}
        )

    # ------------------------------------------------------------- test-then-train and drift
    def _not_yet_applied(self, events) -> np.ndarray:
        """Rows of `events` whose offset the store has not consumed (redeliveries are not)."""
        if events.num_rows == 0:
            return np.zeros(0, dtype=np.int64)
        stored = self.store.offsets(self.topics.behaviours)
        partitions = events.column("partition").to_numpy()
        next_offsets = np.array([stored.get(int(p), 0) for p in range(int(partitions.max()) + 1)])
        return np.flatnonzero(events.column("offset").to_numpy() >= next_offsets[partitions])

    def _score_events(self, events, rows: np.ndarray) -> EventScores | None:
        """Rank each new event's item with the current model before the store (and so the model)
        learns it; publish the ranks to the scores topic."""
        scorer = self.scoring.scorer if self.cfg.recommender == "casm" else None
        if scorer is None or rows.size == 0:
            return None
        users, user_codes = np.unique(
            np.asarray(events.column("user_id").to_pylist(), dtype=object).astype(str), return_inverse=True
        )
        stored = self.store.sequences(users.tolist(), width=self.settings.model.max_len)
        names = self.store.behaviour_names()
        lookup = {name: i + 1 for i, name in enumerate(names)}
        item_ids = events.column("item_id").to_pylist()
        behaviour_names = events.column("behavior").to_pylist()
        scores = score_events(
            scorer, events, rows, stored.items, stored.behaviours, user_codes.reshape(-1),
            self.store.item_index(item_ids),
            np.fromiter((lookup.get(b, 0) for b in behaviour_names), dtype=np.int64, count=len(behaviour_names)),
            self.settings.drift.sampled_negatives, self._score_rng, self.settings.drift.score_batch_size,
        )
        self.report.events_scored += len(scores)
        if self.topics.scores:
            self._publish_scores(events, scores, item_ids, behaviour_names)
        return scores

    def _publish_scores(self, events, scores: EventScores, item_ids: list[str], behaviours: list[str]) -> None:
        users = events.column("user_id").to_pylist()
        partitions = events.column("partition").to_pylist()
        offsets = events.column("offset").to_pylist()
        produced = events.column("produced_ms").to_pylist()
        timestamps = events.column("timestamp").to_pylist()
        version = self.scoring.version
        for k, row in enumerate(scores.rows.tolist()):
            value = json.dumps({
                "user_id": users[row], "item_id": item_ids[row], "behavior": behaviours[row],
                "timestamp": timestamps[row], "partition": partitions[row], "offset": offsets[row],
                "produced_ms": produced[row], "model_version": version,
                "rank_full": int(scores.rank_full[k]), "rank_sampled": int(scores.rank_sampled[k]),
                "num_items": scores.num_items, "num_sampled": self.settings.drift.sampled_negatives,
                "cold": bool(scores.cold[k]),
            }, separators=(",", ":")).encode()
            self.producer.send(self.topics.scores, key=users[row].encode(), value=value)

    def _watch_drift(self, events, rows: np.ndarray, scored: EventScores | None) -> None:
        """Feed the detectors; apply, log, record and count what they decide."""
        hits = []
        if scored is not None:
            k = self.settings.drift.hit_k
            warm = ~scored.cold
            hits = [
                (b, int(0 <= r < k))
                for b, r, w in zip(scored.behaviours, scored.rank_full.tolist(), warm.tolist(), strict=True) if w
            ]
        columns = [events.column(c).to_pylist() for c in ("user_id", "item_id", "behavior", "timestamp", "partition")]
        observed = [tuple(column[r] for column in columns) for r in rows.tolist()]
        detections, changes = self.drift.observe(hits, observed, self.alpha)
        now = time.time()
        for d in detections:
            self.metrics.drifts.labels(d.behaviour, d.signal, d.detector).inc()
            value = self.alpha.get(d.behaviour, self.settings.behaviours.default_alpha)
            self.store.record_drift(now, d.behaviour, d.detector, d.signal, d.value, value, value)
            self.report.drift.append({"kind": "detection", "events_applied": self._events_applied_total,
                                      "behaviour": d.behaviour, "signal": d.signal, "detector": d.detector})
        for c in changes:
            reason = (f"{self.settings.drift.policy} policy after {c.detection.signal} drift of {c.behaviour}: "
                      f"post-detection conversion {c.estimate:.3f} (at {self._events_applied_total} events)")
            self.set_alpha({c.behaviour: c.new}, reason)
            self.store.record_drift(now, c.behaviour, c.detection.detector, f"reweight:{c.detection.signal}",
                                    c.estimate, c.old, c.new)
            self.report.drift.append({"kind": "alpha", "events_applied": self._events_applied_total,
                                      "behaviour": c.behaviour, "old": c.old, "new": c.new, "estimate": c.estimate})
            log.info("alpha[%s] %.3f -> %.3f (%s)", c.behaviour, c.old, c.new, reason)

    # ---------------------------------------------------------------------------- refresh
    def _refresh(self, force: bool) -> None:
        """Publish recommendations for pending users whose batch is full or old enough."""
        delay = self.cfg.refresh_max_delay_ms / 1000.0
        while self._pending:
            oldest = next(iter(self._pending.values()))
            if not force and len(self._pending) < self.cfg.refresh_max_users and time.monotonic() - oldest < delay:
                return
            users = []
            while self._pending and len(users) < self.cfg.refresh_max_users:
                users.append(self._pending.popitem(last=False))
            self._publish([u for u, _ in users], [t for _, t in users])

    def _popularity(self) -> tuple[list[str], list[float]]:
        """The fallback list: most popular items, recomputed at most every popularity_refresh_s."""
        now = time.monotonic()
        if now - self._popular_at >= self.cfg.popularity_refresh_s or not self._popular:
            counts = self.store.item_popularity(self.cfg.popularity_behaviours or None)
            k = min(self.cfg.top_k, counts.size - 1)
            best = np.argsort(-counts[1:], kind="stable")[:k] + 1
            ids = self._item_ids()
            self._popular = [ids[i - 1] for i in best.tolist()]
            self._popular_scores = [float(counts[i]) for i in best.tolist()]
            self._popular_at = now
        return self._popular, self._popular_scores

    def _item_ids(self) -> list[str]:
        """The store's item vocabulary (cached; it only grows)."""
        if len(self._item_id_cache) != self.store.num_items():
            self._item_id_cache = self.store.item_ids()
        return self._item_id_cache

    def _publish(self, users: list[str], pending_since: list[float]) -> None:
        sequences = self.store.sequences(users, width=self.settings.model.max_len)
        item_ids = self._item_ids()
        scorer = self.scoring.scorer if self.cfg.recommender == "casm" else None
        usable = sequences.lengths > 0
        ranked: dict[int, tuple[list[str], list[float], str]] = {}
        if scorer is not None and usable.any():
            rows = np.flatnonzero(usable)
            exclude = None
            if self.cfg.exclude_behaviours:
                names = self.store.behaviour_names()
                chosen = [names.index(b) + 1 for b in self.cfg.exclude_behaviours if b in names]
                exclude = items_with_behaviours(sequences.items[rows], sequences.behaviours[rows], chosen)
            scores, best = scorer.top_k(sequences.items[rows], sequences.behaviours[rows], self.cfg.top_k, exclude)
            for row, row_scores, row_best in zip(rows.tolist(), scores, best, strict=True):
                finite = np.isfinite(row_scores)
                ranked[row] = ([item_ids[i - 1] for i in row_best[finite].tolist()],
                               row_scores[finite].tolist(), "model")
        popular, popular_scores = self._popularity()
        now_wall, now = time.time(), time.monotonic()
        version = str(self.scoring.version)
        send, topic = self.producer.send, self.topics.recommendations
        for row, user in enumerate(users):
            items, scores, source = ranked.get(row, (popular, popular_scores, "popularity"))
            produced_ms = int(sequences.last_produced_ms[row])
            value = recommendation_json(
                user, items, scores, version, now_wall,
                event_time=float(sequences.last_timestamp[row]) if usable[row] else None,
                event_partition=int(sequences.last_partition[row]) if usable[row] else None,
                event_offset=int(sequences.last_offset[row]) if usable[row] else None,
                event_produced_ms=produced_ms if produced_ms >= 0 else None,
                source=source,
            )
            send(topic, key=user.encode(), value=value)
            self.metrics.published.labels(source).inc()
            self.metrics.refresh_latency.observe(now - pending_since[row])
            if produced_ms >= 0:
                self.metrics.freshness.observe(max(0.0, now_wall - produced_ms / 1000.0))
            if source == "popularity":
                self.report.popularity_fallbacks += 1
            self._unrecorded[user] = (items, self.scoring.version, now_wall, int(sequences.last_offset[row]))
        self.report.recommendations += len(users)
        if now - self._recorded_at >= self.cfg.published_record_every_s:
            self._record_published()

    def _record_published(self) -> None:
        """Remember the last recommendation of each user in the store (batched: one write per
        `published_record_every_s`; Kafka holds every recommendation anyway)."""
        by_version: dict[int, list[tuple[str, list[str], float, int]]] = {}
        for user, (items, version, at, offset) in self._unrecorded.items():
            by_version.setdefault(version, []).append((user, items, at, offset))
        for version, rows in by_version.items():
            self.store.record_published(
                [r[0] for r in rows], version, [r[1] for r in rows],
                published_at=max(r[2] for r in rows), event_offsets=[r[3] for r in rows],
            )
        self._unrecorded.clear()
        self._recorded_at = time.monotonic()

    # --------------------------------------------------------------------------- training
    def _maybe_fine_tune(self) -> None:
        if (
            self.cfg.recommender != "casm"
            or self.worker.busy
            or self._events_applied_total < self.cfg.min_events_to_train
        ):
            return
        due_by_count = self._events_since_training >= self.cfg.fine_tune_every_events
        due_by_time = (
            time.monotonic() - self._last_training >= self.cfg.fine_tune_every_s
            and self._events_since_training >= self.cfg.min_events_to_train
        )
        if not (due_by_count or due_by_time):
            return
        sample = self.store.sample_training_sequences(
            self.cfg.fine_tune_sample_users,
            seed=self._next_version,
            min_length=2,
            width=self.settings.model.max_len + 1,
        )
        if len(sample) == 0:
            return
        item_ids = self._item_ids()
        names = self.store.behaviour_names()
        job = FineTuneJob(
            version=self._next_version,
            items=sample.items,
            behaviours=sample.behaviours,
            new_item_ids=item_ids[self._trainer_item_count :],
            behaviour_names=names,
            alpha=dict(self.alpha),
            steps=self.cfg.fine_tune_steps,
            checkpoint_path=str(self._checkpoint_path(self._next_version)),
        )
        self.worker.submit(job)
        self._trainer_item_count = len(item_ids)
        self._events_since_training = 0
        self._last_training = time.monotonic()
        log.debug("fine-tuning version %d on %d sequences", job.version, len(sample))
        if self.cfg.synchronous_training:
            self._collect_trained(wait_s=self.cfg.worker_timeout_s)

    def _worker_ready(self, wait_s: float = 0.0) -> bool:
        """Whether the trainer process is up; when it just came up from a checkpoint, its weights
        become the serving model."""
        if self.worker.ready:
            return True
        if not self.worker.poll_ready(wait_s):
            return False
        if self._initial_version is not None:
            self.scoring.load(
                self._initial_version, self.worker.initial_weights, self.worker.initial_num_items,
                self._initial_behaviours,
            )
            self.metrics.model_version.set(self._initial_version)
            log.info("serving model version %d", self._initial_version)
        return True

    def _collect_trained(self, wait_s: float = 0.0) -> None:
        trained = self.worker.wait(wait_s) if wait_s else self.worker.poll()
        if trained is not None:
            self._adopt(trained)

    def _adopt(self, trained: TrainedVersion) -> None:
        self.scoring.load(trained.version, trained.weights, trained.num_items, trained.behaviour_names)
        self._next_version = trained.version + 1
        metrics = {"loss": trained.loss, "positions": float(trained.positions), "seconds": trained.seconds}
        metrics.update({f"loss.{b}": v for b, v in trained.loss_by_behaviour.items()})
        self.store.register_model(
            trained.version, time.time(), self.alpha, metrics, trained.checkpoint_path or ""
        )
        self._prune_checkpoints()
        self.report.model_version = trained.version
        self.report.fine_tunes += 1
        self.metrics.model_version.set(trained.version)
        self.metrics.fine_tunes.inc()
        self.metrics.fine_tune_seconds.observe(trained.seconds)
        self.metrics.train_loss.set(trained.loss)
        for behaviour, value in trained.loss_by_behaviour.items():
            self.metrics.train_loss_by_behaviour.labels(behaviour).set(value)
        log.info("model version %d: loss %.4f on %d positions in %.2f s",
                 trained.version, trained.loss, trained.positions, trained.seconds)

    def _checkpoint_path(self, version: int) -> Path:
        return self.cfg.checkpoint_dir / f"casm-v{version:06d}.pt"

    def _prune_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints` checkpoint files."""
        kept = sorted(self.cfg.checkpoint_dir.glob("casm-v*.pt"))
        for old in kept[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)

    def set_alpha(self, alpha: dict[str, float], reason: str) -> dict[str, float]:
        """Use `alpha` from the next fine-tuning round on; recorded in the store's alpha history."""
        old = dict(self.alpha)
        self.alpha.update(alpha)
        self.store.record_alpha(time.time(), self.alpha, reason)
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
        log.info("shutting down (%s): publishing %d pending users", self.stopped_by or "error", len(self._pending))
        try:
            self._refresh(force=True)
            self._record_published()
            self.producer.flush(timeout=self.settings.kafka.request_timeout_ms / 1000)
            try:
                self.consumer.commit({
                    tp: _offset_and_metadata(offset)
                    for (topic, partition), offset in self.store.all_offsets().items()
                    if (tp := _topic_partition(topic, partition)) in self.consumer.assignment()
                })
            except Exception as exc:  # noqa: BLE001 - informational commit only
                log.debug("final commit failed: %s", exc)
            self._collect_trained(wait_s=self.cfg.worker_timeout_s)  # every version is checkpointed
        finally:
            self.report.offsets = {f"{t}[{p}]": o for (t, p), o in self.store.all_offsets().items()}
            self.report.alpha = dict(self.alpha)
            self.worker.close(timeout_s=5.0)
            self.consumer.close()
            self.producer.close(timeout=5)
            self.store.close()
            if self.telemetry:
                self.telemetry.stop()


def recommendation_json(
    user: str,
    items: Sequence[str],
    scores: Sequence[float],
    model_version: str,
    generated_at: float,
    *,
    event_time: float | None,
    event_partition: int | None,
    event_offset: int | None,
    event_produced_ms: int | None,
    source: str,
) -> bytes:
    """A `stream.models.Recommendation` as JSON bytes, built directly (the hot path publishes one
    per touched user; a test checks it against the model)."""
    return json.dumps({
        "user_id": user,
        "items": [{"item_id": i, "score": float(s)} for i, s in zip(items, scores, strict=True)],
        "model_version": model_version,
        "generated_at": generated_at,
        "event_time": event_time,
        "event_partition": event_partition,
        "event_offset": event_offset,
        "event_produced_ms": event_produced_ms,
        "source": source,
    }, separators=(",", ":")).encode()


def _offset_and_metadata(offset: int):
    from kafka.structs import OffsetAndMetadata

    return OffsetAndMetadata(offset, "", -1)


def _topic_partition(topic: str, partition: int):
    from kafka.structs import TopicPartition

    return TopicPartition(topic, partition)
