"""Test-then-train signals of the live stream and the drift policy wiring.

`prepare` runs on the ingest thread just before a batch is applied: it captures what the model of
that moment needs (the users' stored sequences, the serving model) so the batch can then be applied
without waiting. `process` runs on the publisher thread: it ranks the batch's events
(`event_scoring`), publishes the ranks to the scores topic, feeds the drift detectors, and applies
the alpha changes they lead to (written to the store's alpha history and drift log, counted in
metrics, logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from kafka import KafkaProducer

from casm_core.scoring import Scorer
from consumers.adapt.drift import AlphaChange, Detection, DriftMonitor
from consumers.adapt.event_scoring import EventScores, score_events
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from state.events import ApplyResult
from state.store import StateStore

log = logging.getLogger(__name__)

SetAlpha = Callable[[dict[str, float], str], dict[str, float]]

WATCHED_CACHE_USERS = 200_000
"""Users whose sample membership is remembered (about 30 MB at most); the cache starts afresh past it."""

STATE_NAME = "drift_monitor"
"""The store's `component_state` name of the detectors' and the policy's saved state."""


@dataclass
class SignalJob:
    """One applied batch as the model of its moment saw it."""

    events: pa.Table  # the watched users' applied rows (no redeliveries or duplicates)
    scored_rows: np.ndarray  # rows to rank
    scorer: Scorer | None
    version: int
    stored_items: np.ndarray
    stored_behaviours: np.ndarray
    user_codes: np.ndarray
    item_codes: np.ndarray
    behaviour_codes: np.ndarray
    events_applied: int  # applied before this batch, for the drift log


class SignalWatch:
    """Test-then-train ranks and drift detection (see the module docstring)."""

    def __init__(
        self,
        settings: CasmSettings,
        store: StateStore,
        producer: KafkaProducer,
        metrics: ServiceMetrics,
        set_alpha: SetAlpha,
        alpha: Callable[[], dict[str, float]],
        request_similarity: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.drift
        self.store = store
        self.producer = producer
        self.metrics = metrics
        self.set_alpha = set_alpha
        self.alpha = alpha
        self.request_similarity = request_similarity
        self.monitor = DriftMonitor(self.cfg, settings.behaviours.target)
        self._watched_users: dict[str, bool] = {}
        self._other_rng = np.random.default_rng(self.cfg.seed + 1)  # the apply thread's (self.rng: the signals')
        self._excluded: list[int] | None = None
        self._hash_key = self.cfg.seed.to_bytes(8, "little", signed=True)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.events_scored = 0
        self.events_applied = 0  # as of the newest batch watched
        self.log: list[dict] = []
        self._lock = threading.Lock()  # the monitor: publisher thread (batches), ingest thread (similarity)
        self._persisted_at = time.monotonic()
        self._restore()

    # ------------------------------------------------------------------------ saved state
    def state_bytes(self) -> bytes:
        """The detectors', conversion tracker's and policy's state, and the sampling RNG."""
        with self._lock:
            return pickle.dumps({"monitor": self.monitor, "rng": self.rng.bit_generator.state,
                                 "events_scored": self.events_scored, "policy": self.cfg.policy,
                                 "detector": self.cfg.detector})

    def persist(self) -> None:
        """Save the state to the store (a restart resumes from it)."""
        self.store.registry.save_component_state(STATE_NAME, self.state_bytes(), self.events_applied, time.time())
        self._persisted_at = time.monotonic()

    def maybe_persist(self) -> None:
        if time.monotonic() - self._persisted_at >= self.cfg.persist_every_s:
            self.persist()

    def _restore(self) -> None:
        saved = self.store.registry.component_state(STATE_NAME)
        if saved is None:
            return
        try:
            state = pickle.loads(saved[0])  # noqa: S301 - our own store, written by persist()
        except Exception as exc:  # noqa: BLE001 - e.g. written by another version: start afresh
            log.warning("saved drift state could not be read (%s): starting the detectors afresh", exc)
            return
        if state.get("policy") != self.cfg.policy or state.get("detector") != self.cfg.detector:
            log.info("saved drift state is of policy %r / detector %r, not %r / %r: starting afresh",
                     state.get("policy"), state.get("detector"), self.cfg.policy, self.cfg.detector)
            return
        monitor: DriftMonitor = state["monitor"]
        monitor.cfg = monitor.detectors.cfg = self.cfg  # settings of this run (thresholds may change)
        if hasattr(monitor.policy, "cfg"):
            monitor.policy.cfg = self.cfg
        self.monitor = monitor
        self.rng.bit_generator.state = state["rng"]
        self.events_scored = state["events_scored"]
        self.events_applied = saved[1]
        log.info("drift detectors restored as saved at %d applied events (%d detections so far)",
                 saved[1], len(monitor.detections))

    def on_similarity(self, similarity) -> None:
        """A gradient-similarity measurement from the trainer (ingest thread): the policy may
        re-weight alpha."""
        with self._lock:
            changes = self.monitor.policy.on_similarity(similarity.similarity, self.alpha())
        for change in changes:
            self._reweighted(change, similarity.events_applied)

    def watched(self, users: list[str]) -> np.ndarray:
        """Whether each of `users` is in the `drift.user_share` sample (bool [n]): a hash of the id
        seeded by `drift.seed`, so a user is in or out for good and reruns agree."""
        share, cache = self.cfg.user_share, self._watched_users
        if share >= 1.0:
            return np.ones(len(users), dtype=bool)
        if len(cache) > WATCHED_CACHE_USERS:
            cache.clear()
        key = self._hash_key
        out = np.empty(len(users), dtype=bool)
        for i, user in enumerate(users):
            inside = cache.get(user)
            if inside is None:
                digest = hashlib.blake2b(user.encode(), digest_size=8, key=key).digest()
                inside = cache[user] = int.from_bytes(digest, "little") < share * 2.0**64
            out[i] = inside
        return out

    def prepare(self, events: pa.Table, applied: ApplyResult, scorer: Scorer | None, version: int,
                events_applied: int) -> SignalJob:
        """The batch as the model of its moment saw it (apply thread), from what the store's
        `apply(..., before_width=model.max_len)` returned, so the store is not read again: the
        applied rows of the watched users (`watched`), all of them, with those users' windows
        before the batch, so that each user's earlier events of the batch are in the windows its
        later ones are ranked after. `events_applied`: events in the store before the batch."""
        watched = self.watched(applied.user_ids)
        keep = applied.rows[watched[applied.user_codes[applied.rows]]]
        events = events.take(pa.array(keep))
        users = np.flatnonzero(watched)
        code = np.full(watched.size, -1, dtype=np.int64)
        code[users] = np.arange(users.size)
        scored = np.zeros(0, dtype=np.int64)
        if scorer is not None and keep.size:
            # Every target event is ranked (evaluation needs them all); the others in a share.
            is_target = pc.equal(events.column("behavior"), self.settings.behaviours.target).to_numpy(zero_copy_only=False)
            scored = np.flatnonzero(is_target | (self._other_rng.random(keep.size) < self.cfg.score_other_fraction))
        return SignalJob(
            events, scored, scorer if scored.size else None, version,
            applied.before_items[users], applied.before_behaviours[users], code[applied.user_codes[keep]],
            applied.item_idx[keep], applied.behaviour_idx[keep], events_applied,
        )

    def process(self, job: SignalJob) -> None:
        """Rank, publish, watch for drift (publisher thread)."""
        scores = None
        if job.scorer is not None:
            scores = score_events(
                job.scorer, job.scored_rows, job.stored_items, job.stored_behaviours, job.user_codes,
                job.item_codes, job.behaviour_codes, self.cfg.sampled_negatives, self.rng,
                self.cfg.score_chunk_events, self._excluded_behaviours(),
            )
            self.events_scored += len(scores)
            if self.settings.topics.scores:
                self._publish(job, scores)
        self._watch(job, scores)

    def _excluded_behaviours(self) -> list[int]:
        """Indices of `serve.exclude_behaviours`: the full ranks leave their items out, as the lists do
        (kept once every name is known: indices never change)."""
        wanted = self.settings.serve.exclude_behaviours
        if self._excluded is not None:
            return self._excluded
        names = self.store.behaviour_names()
        found = [names.index(b) + 1 for b in wanted if b in names]
        if len(found) == len(wanted):
            self._excluded = found
        return found

    def _publish(self, job: SignalJob, scores: EventScores) -> None:
        """One message per batch (columns as JSON arrays): one per event would cost a produce each."""
        rows = scores.rows.tolist()
        columns = {
            name: job.events.column(name).to_pylist()
            for name in ("user_id", "item_id", "behavior", "partition", "offset", "produced_ms")
        }
        value = json.dumps({
            "model_version": job.version,
            "num_items": scores.num_items,
            "num_sampled": self.cfg.sampled_negatives,
            **{name: [values[r] for r in rows] for name, values in columns.items()},
            "rank_full": scores.rank_full.tolist(),
            "rank_sampled": scores.rank_sampled.tolist(),
            "cold": scores.cold.tolist(),
        }, separators=(",", ":")).encode()
        self.producer.send(self.settings.topics.scores, value=value)

    def _watch(self, job: SignalJob, scores: EventScores | None) -> None:
        names = job.events.column("behavior").to_pylist()
        hits = []
        if scores is not None:
            k = self.cfg.hit_k
            hits = [
                (names[row], int(0 <= rank < k))
                for row, rank, cold in zip(scores.rows.tolist(), scores.rank_full.tolist(), scores.cold.tolist(),
                                           strict=True)
                if not cold
            ]
        columns = [job.events.column(c).to_pylist() for c in ("user_id", "item_id", "behavior", "timestamp", "partition")]
        observed = list(zip(*columns, strict=True))
        with self._lock:
            detections, changes = self.monitor.observe(hits, observed, self.alpha())
            self.events_applied = job.events_applied + len(observed)
        for detection in detections:
            self._detected(detection, job.events_applied)
        for change in changes:
            self._reweighted(change, job.events_applied)

    def _detected(self, d: Detection, events_applied: int) -> None:
        self.metrics.drifts.labels(d.behaviour, d.signal, d.detector).inc()
        value = self.alpha().get(d.behaviour, self.settings.behaviours.default_alpha)
        self.store.registry.record_drift(time.time(), d.behaviour, d.detector, d.signal, d.value, value, value)
        self.log.append({"kind": "detection", "events_applied": events_applied, "behaviour": d.behaviour,
                         "signal": d.signal, "detector": d.detector})
        if self.monitor.policy.measures_gradients and self.request_similarity is not None:
            self.request_similarity()

    def _reweighted(self, c: AlphaChange, events_applied: int) -> None:
        trigger = f"after {c.detection.signal} drift of {c.behaviour}" if c.detection else "scheduled"
        measured = "post-detection conversion" if c.basis == "conversion" else "gradient cosine with the target"
        reason = f"{self.cfg.policy} policy {trigger}: {measured} {c.estimate:.3f} (at {events_applied} events)"
        self.set_alpha({c.behaviour: c.new}, reason)
        self.store.registry.record_drift(time.time(), c.behaviour, c.detection.detector if c.detection else c.basis,
                                f"reweight:{c.detection.signal if c.detection else 'scheduled'}",
                                c.estimate, c.old, c.new)
        self.log.append({"kind": "alpha", "events_applied": events_applied, "behaviour": c.behaviour,
                         "old": c.old, "new": c.new, "estimate": c.estimate, "basis": c.basis})
        log.info("alpha[%s] %.3f -> %.3f (%s)", c.behaviour, c.old, c.new, reason)
