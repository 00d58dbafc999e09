"""The publishing half of `casm serve`: refreshed top-K for the users touched since their last
list, and the test-then-train signals of each applied batch. It runs on two threads of its own
(refreshes; signal jobs, so that neither waits for the other), overlapping ingestion (torch and
DuckDB release the GIL), or inline when the service is stepped by hand (tests).

Users are refreshed in micro-batches bounded in size (`refresh_max_users`) and delay
(`refresh_max_delay_ms`) and ranked by `serve.recommender` after their stored window
(`model.max_len` events): the model (`source: model`) or the recent-items baseline (`source:
recent`). Users with no usable history, all users before the first model version, and all users
of the popularity recommender get the most-popular list (`source: popularity`). Every list
leaves out the user's `serve.exclude_behaviours` items (`consumers.serve.ranking`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from casm_core.baselines import RecentItems
from casm_core.scoring import Scorer
from consumers.adapt.signals import SignalJob, SignalWatch
from consumers.serve.item_space import ItemSpace
from consumers.serve.published_hits import PublishedHits
from consumers.serve.ranking import PopularItems, RankedList, Ranker, exclusions, ranked_lists
from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from state.store import StateStore
from stream.delivery import AcknowledgedProducer

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5
"""Longest sleep of an idle publisher thread between checks (each is woken by new work anyway)."""


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


@dataclass(frozen=True)
class _Sent:
    """A list handed to the producer, to be counted and recorded once acknowledged."""

    user: str
    items: list[str]
    version: int
    at: float  # wall-clock time it was generated (unix s)
    offset: int  # offset of the newest event it reflects
    source: str
    pending_since: float  # monotonic time the user became pending
    produced_ms: int  # Kafka timestamp of that event (ms), -1 if unknown
    popular: list[str]  # the popularity list of the same user at the same moment (published HR; [] without)


class Publisher:
    """Pending users and signal jobs in, recommendations and scores out (thread-safe)."""

    def __init__(
        self,
        settings: CasmSettings,
        store: StateStore,
        producer: AcknowledgedProducer,
        serving: ServingModel,
        metrics: ServiceMetrics,
        signals: SignalWatch | None,
        lists: bool = True,
        hits: PublishedHits | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.serve
        self.store = store
        self.producer = producer
        self.serving = serving
        self.metrics = metrics
        self.signals = signals
        self.lists = lists
        self.hits = hits  # the published HR@K: acknowledged lists, and popularity's beside them, go there
        self._cond = threading.Condition()
        self._pending: OrderedDict[str, float] = OrderedDict()  # user -> when it became pending
        self._jobs: deque[SignalJob] = deque()
        self._thread: threading.Thread | None = None  # refreshes users
        self._signal_thread: threading.Thread | None = None  # processes signal jobs
        self._closing = False
        self._working = 0  # batches or jobs taken but not finished
        self.error: BaseException | None = None
        self.recommendations = 0
        self.popularity_fallbacks = 0
        self._unrecorded: dict[str, tuple[list[str], int, float, int]] = {}  # user -> (items, version, at, offset)
        self._recorded_at = time.monotonic()
        self._counts = np.zeros(1, dtype=np.int64)  # popularity counts [num_items + 1]
        self._popular: PopularItems | None = None
        self._popular_at = -float("inf")
        self._recent: RecentItems | None = None
        self._item_ids: list[str] = []
        self._item_space: ItemSpace | None = None  # scale-out: the followed version's item space
        self._item_space_version = -1
        self._space_popular: tuple[PopularItems, PopularItems, int] | None = None  # (store's, in space, size)

    # ------------------------------------------------------------------ ingest-thread side
    def touch(self, users: Sequence[str], when: float) -> None:
        """Users whose state changed at monotonic time `when` (kept at their first pending time);
        ignored when this publisher publishes no lists (the trainer role)."""
        if not self.lists:
            return
        with self._cond:
            for user in users:
                self._pending.setdefault(user, when)
            self._cond.notify()

    def forget(self, users: Sequence[str]) -> None:
        """Drop `users` from the pending lists and from those not yet recorded in the store (their
        partition moved to another instance, which publishes for them now)."""
        with self._cond:
            for user in users:
                self._pending.pop(user, None)
                self._unrecorded.pop(user, None)

    def submit(self, job: SignalJob) -> None:
        """Queue a batch's signals; blocks while `publisher_queue_batches` are waiting (backpressure)."""
        with self._cond:
            while self._thread is not None and len(self._jobs) >= self.cfg.publisher_queue_batches and self.error is None:
                self._cond.wait(0.1)
            self._jobs.append(job)
            self._cond.notify()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every pending user is published and every queued job processed (the
        thread's work; inline publishing is never behind). False after `timeout_s`."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while (self._pending or self._jobs or self._working) and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + len(self._jobs)

    # ------------------------------------------------------------------------- the work
    def start(self) -> None:
        """Work on threads of its own from now on: one refreshes users, one processes signal jobs
        (so that a backlog of users to refresh never holds the jobs, and with them ingestion, back)."""
        self._thread = threading.Thread(target=self._loop, name="casm-publisher", daemon=True)
        self._signal_thread = threading.Thread(target=self._signal_loop, name="casm-signals", daemon=True)
        self._thread.start()
        self._signal_thread.start()

    @property
    def threaded(self) -> bool:
        """Whether the publisher works on its own threads (else the caller runs `work`)."""
        return self._thread is not None

    def _users_due_in(self) -> float:
        """Seconds until the pending users are due (0: now; inf: none). Caller holds the lock."""
        if not self._pending:
            return float("inf")
        if len(self._pending) >= self.cfg.refresh_max_users:
            return 0.0
        oldest = next(iter(self._pending.values()))
        return max(0.0, oldest + self.cfg.refresh_max_delay_ms / 1000.0 - time.monotonic())

    def _failed(self, exc: BaseException, what: str) -> None:
        log.exception("%s failed", what)
        self.error = exc
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and self._users_due_in() > 0:
                        self._cond.wait(min(self._users_due_in(), IDLE_WAIT_S))
                    if self._closing and not self._pending:
                        return
                while self._refresh(force=self._closing):
                    pass
                if time.monotonic() - self._recorded_at >= self.cfg.published_record_every_s:
                    self.record_published()
                if self._pending and not self.delivering():
                    if self._closing:
                        log.warning("closing with %d users unpublished: outputs cannot be delivered "
                                    "(they are refreshed at the next start)", len(self._pending))
                        return
                    with self._cond:  # wait for the producer's retries to find the broker again
                        self._cond.wait(self.settings.kafka.delivery_backoff_ms / 1000.0)
        except BaseException as exc:  # noqa: BLE001 - reported to the ingest thread, which stops
            self._failed(exc, "publisher")

    def _signal_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closing and not self._jobs:
                        self._cond.wait(IDLE_WAIT_S)
                    if self._closing and not self._jobs:
                        return
                self._process_job()
        except BaseException as exc:  # noqa: BLE001 - reported to the ingest thread, which stops
            self._failed(exc, "signal processing")

    def _refresh(self, force: bool) -> bool:
        """Refresh one micro-batch of the users that are due (any pending with `force`); False
        when there was none."""
        delivering = self.delivering()
        with self._cond:
            if not (self._pending and delivering and (force or self._users_due_in() <= 0)):
                return False
            count = min(self.cfg.refresh_max_users, len(self._pending))
            batch = [self._pending.popitem(last=False) for _ in range(count)]
            self._working += 1
            self._cond.notify_all()
        try:
            self._publish([u for u, _ in batch], [t for _, t in batch])
        finally:
            with self._cond:
                self._working -= 1
                self._cond.notify_all()
        return True

    def _process_job(self) -> bool:
        """Process the oldest queued signal job; False when there was none."""
        with self._cond:
            if not self._jobs:
                return False
            job = self._jobs.popleft()
            self._working += 1
            self._cond.notify_all()
        try:
            if self.signals is not None:
                self.signals.process(job)
        finally:
            with self._cond:
                self._working -= 1
                self._cond.notify_all()
        return True

    def work(self, force: bool = False) -> None:
        """Inline (no threads): refresh the users that are due (all with `force`), then process
        the queued signal jobs. Refreshing comes first: it is what freshness is measured on, while
        signals only feed the drift detectors and the evaluation."""
        while self._refresh(force) or self._process_job():
            pass
        if time.monotonic() - self._recorded_at >= self.cfg.published_record_every_s:
            self.record_published()

    def close(self, timeout_s: float) -> None:
        """Finish what is queued and pending, then stop the thread (or do it inline)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        threads = [thread for thread in (self._thread, self._signal_thread) if thread is not None]
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.error("%s did not finish within %s s", thread.name, timeout_s)
        if self.error is None and not any(thread.is_alive() for thread in threads):
            self.work(force=True)
        flush = getattr(self.producer, "flush", None)
        if flush is not None:
            flush(timeout=self.settings.kafka.request_timeout_ms / 1000.0)  # acknowledgements in
        self.record_published()

    # ---------------------------------------------------------------------- publishing
    def _item_vocabulary(self) -> list[str]:
        """The store's item ids (cached; the vocabulary only grows)."""
        if len(self._item_ids) != self.store.num_items():
            self._item_ids = self.store.item_ids()
        return self._item_ids

    def _popularity(self) -> PopularItems:
        """The popularity ranker over the store's counts (`popularity_behaviours`), recounted at
        most every `popularity_refresh_s`."""
        now = time.monotonic()
        # Deterministic training recounts at every refresh: lists must not depend on the clock.
        every_s = 0.0 if self.cfg.training == "deterministic" else self.cfg.popularity_refresh_s
        if self._popular is None or now - self._popular_at >= every_s:
            self._counts = self.store.item_popularity(self.cfg.popularity_behaviours or None)
            self._popular, self._recent = PopularItems(self._counts), None
            self._popular_at = now
        return self._popular

    def _recent_items(self) -> RecentItems:
        """The recent-items baseline over the current counts and the whole item vocabulary (items
        newer than the counts count 0, but are in users' windows and so recommendable)."""
        num_items = len(self._item_vocabulary())
        if self._recent is None or self._recent.num_items != num_items:
            counts = np.zeros(num_items + 1, dtype=np.int64)
            counted = min(self._counts.size, counts.size)
            counts[:counted] = self._counts[:counted]
            self._recent = RecentItems(counts)
        return self._recent

    def _ranker(self, scorer: Scorer | None, catalogue: int) -> tuple[Ranker | None, str]:
        """What ranks users with history, and its source label; None: the popularity list."""
        if self.cfg.has_model:
            # Items the store knows but this model version does not (seen since its fine-tune)
            # can still be repeated: the scorer covers the whole catalogue.
            return (None if scorer is None else scorer.with_catalogue(catalogue)), "model"
        if self.cfg.recommender == "recent":
            return self._recent_items(), "recent"
        return None, "popularity"

    def _space(self, model_items: list[str] | None, version: int) -> ItemSpace | None:
        """The item space of a version trained elsewhere (scale-out), brought up to the store's
        vocabulary; None for a version trained on this store (its indices are the store's)."""
        if model_items is None:
            return None
        if self._item_space is None or self._item_space_version != version:
            self._item_space, self._item_space_version = ItemSpace(model_items), version
            self._space_popular = None
        self._item_space.extend(self._item_vocabulary())
        return self._item_space

    def _lists(self, items: np.ndarray, behaviours: np.ndarray, lengths: np.ndarray, scorer: Scorer | None,
               space: ItemSpace | None) -> tuple[dict[int, tuple[RankedList, str]], dict[int, RankedList]]:
        """Each row's list and source: rows with history by the recommender (`scorer` is the
        model's, None before its first version), the others by popularity; the same exclusions
        for all. `items` are in the scorer's index space (`space`, else the store's). Beside
        them, for the published HR (`hits`), each row's popularity list (empty without `hits`)."""
        popular = self._popularity()  # first: the recent-items baseline uses its counts
        if space is not None:
            if self._space_popular is None or self._space_popular[0] is not popular or self._space_popular[2] != len(space.ids):
                self._space_popular = (popular, PopularItems(space.counts(self._counts)), len(space.ids))
            popular = self._space_popular[1]
        ranker, source = self._ranker(scorer, len(self._item_vocabulary()) if space is None else len(space.ids))
        exclude = exclusions(items, behaviours, self.store.behaviour_names(), self.cfg.exclude_behaviours)
        known = lengths > 0
        groups = [(~known, popular, "popularity")]
        groups += [(known, ranker, source)] if ranker is not None else [(known, popular, "popularity")]
        lists: dict[int, tuple[RankedList, str]] = {}
        for chosen, by, label in groups:
            rows = np.flatnonzero(chosen)
            if rows.size == 0:
                continue
            ranked = ranked_lists(by, items[rows], behaviours[rows], self.cfg.top_k,
                                  None if exclude is None else exclude[rows])
            lists.update(zip(rows.tolist(), ((r, label) for r in ranked), strict=True))
        popular_lists: dict[int, RankedList] = {}
        if self.hits is not None:
            by_popularity = [row for row, (_, label) in lists.items() if label == "popularity"]
            popular_lists = {row: lists[row][0] for row in by_popularity}
            rows = np.setdiff1d(np.arange(items.shape[0]), by_popularity)
            if rows.size:
                ranked = ranked_lists(popular, items[rows], behaviours[rows], self.cfg.top_k,
                                      None if exclude is None else exclude[rows])
                popular_lists.update(zip(rows.tolist(), ranked, strict=True))
        return lists, popular_lists

    def _publish(self, users: list[str], pending_since: list[float]) -> None:
        version, scorer, model_items = self.serving.snapshot  # one consistent (version, model) pair
        sequences = self.store.sequences(users, width=self.settings.model.max_len)
        space = self._space(model_items, version)
        items = sequences.items if space is None else space.items(sequences.items)
        lists, popular_lists = self._lists(items, sequences.behaviours, sequences.lengths, scorer, space)
        ids = self._item_vocabulary() if space is None else space.ids
        now_wall = time.time()
        send, topic = self.producer.send, self.settings.topics.recommendations
        for row, user in enumerate(users):
            (best, best_scores), source = lists[row]
            items = [ids[i - 1] for i in best.tolist()]
            scores = best_scores.tolist()
            known = bool(sequences.lengths[row] > 0)
            produced_ms = int(sequences.last_produced_ms[row])
            popular = [ids[i - 1] for i in popular_lists[row][0].tolist()] if popular_lists else []
            sent = _Sent(user, items, version, now_wall, int(sequences.last_offset[row]), source,
                         pending_since[row], produced_ms, popular)
            send(topic, key=user.encode(), value=recommendation_json(
                user, items, scores, str(version), now_wall,
                event_time=float(sequences.last_timestamp[row]) if known else None,
                event_partition=int(sequences.last_partition[row]) if known else None,
                event_offset=int(sequences.last_offset[row]) if known else None,
                event_produced_ms=produced_ms if produced_ms >= 0 else None,
                source=source,
            ), on_ack=lambda _meta, sent=sent: self._acknowledged(sent),
                on_fail=lambda exc, sent=sent: self._undelivered(sent, exc))

    def _acknowledged(self, sent: _Sent) -> None:
        """The broker has `sent` (producer I/O thread): count it and remember it for the store."""
        self.metrics.published.labels(sent.source).inc()
        self.metrics.refresh_latency.observe(time.monotonic() - sent.pending_since)
        if sent.produced_ms >= 0:
            self.metrics.freshness.observe(max(0.0, time.time() - sent.produced_ms / 1000.0))
        if self.hits is not None:
            self.hits.published(sent.user, sent.items, sent.at, sent.popular)
        with self._cond:
            self.recommendations += 1
            self.popularity_fallbacks += sent.source == "popularity"
            known = self._unrecorded.get(sent.user)
            if known is None or known[2] <= sent.at:  # an older list acknowledged late stays older
                self._unrecorded[sent.user] = (sent.items, sent.version, sent.at, sent.offset)

    def _undelivered(self, sent: _Sent, exc: BaseException) -> None:
        """`sent` was given up by the producer: the user is pending again (a fresh list is sent
        once outputs can be delivered); the store never marks it published."""
        self.metrics.publish_failed.inc()
        self.touch([sent.user], sent.pending_since)

    def delivering(self) -> bool:
        """Whether new lists should be sent now: the producer delivers, or has nothing in flight
        (then a send is the probe that finds out whether the broker is back)."""
        health = getattr(self.producer, "health", None)
        if health is None:
            return True
        return health()[0] or self.producer.backlog == 0

    def record_published(self) -> None:
        """Remember each user's last acknowledged list in the store (one write per
        `published_record_every_s`; Kafka holds every list anyway). A list the broker never
        acknowledged is never recorded, so the start-up healing sends it again."""
        with self._cond:
            unrecorded, self._unrecorded = self._unrecorded, {}
        by_version: dict[int, list[tuple[str, list[str], float, int]]] = {}
        for user, (items, version, at, offset) in unrecorded.items():
            by_version.setdefault(version, []).append((user, items, at, offset))
        for version, rows in by_version.items():
            self.store.registry.record_published(
                [r[0] for r in rows], version, [r[1] for r in rows],
                published_at=max(r[2] for r in rows), event_offsets=[r[3] for r in rows],
            )
        self._recorded_at = time.monotonic()
