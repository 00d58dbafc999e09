"""The second stage of `casm serve`'s ingest: decoded batches in, state out.

The polling stage (`Service`, the thread that owns the Kafka consumer) polls and decodes; this
stage owns everything that writes state: it delivers the batch's dead letters, drops conflicting
duplicates, captures the test-then-train view (`signals`), applies the events and their offsets
to the store in one transaction, hands the touched users to the publisher and the trainer, and
does the trainer's and the store's housekeeping. One commit, in this order, for every batch:

1. dead letters acknowledged by the broker (else the batch is held back: nothing of it is applied
   and the polling stage re-reads from the store's offsets, see `rewind_wanted`);
2. scale-out, ingest role only: the batch's changelog records acknowledged by the broker (else
   the batch is held back as in 1; `changelog_writer`);
3. events and input offsets (and the changelog's) written to the store in one transaction (the
   store is the truth for offsets: a restart seeks to them, and events below them are dropped as
   redeliveries);
4. outputs: the touched users are queued for the publisher, which counts a list only once the
   broker acknowledged it; Kafka's group offsets are committed afterwards, for monitoring only.

On its own thread (`serve.apply_queue_batches` > 0) the stage takes every queued batch at once, up to
`serve.apply_max_events` events, and applies them in one transaction: under a backlog the
store's per-transaction cost is spread over many polls, and the store's write (DuckDB, outside
the GIL) overlaps the next poll and decode. Inline (no thread: tests, the deterministic mode),
the polling stage calls `run_inline` after each batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from consumers.adapt.signals import SignalWatch
from consumers.serve.changelog_writer import ChangelogWriter
from consumers.serve.duplicates import split_conflicts
from consumers.serve.model_follower import ModelFollower
from consumers.serve.publisher import Publisher
from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from consumers.training.link import TrainerLink
from state.store import ApplyResult, StateStore
from stream.deadletters import DeadLetterPublisher
from stream.decode import EventValidator
from stream.delivery import wait_all
from stream.models import DeadLetter

log = logging.getLogger(__name__)


@dataclass
class DecodedBatch:
    """One or more polls, decoded.

    Attributes:
        records: the polled records, in poll order (dead letters point back at them).
        events: the valid events (`stream.decode.DECODED_SCHEMA`), in the order of `records`.
        dead: a dead letter per record that did not decode.
        offsets: next offset to read per (topic, partition) after these records.
        generation: the polling stage's rewind generation the records were read in.
    """

    records: list
    events: pa.Table
    dead: list[DeadLetter]
    offsets: dict[tuple[str, int], int]
    generation: int

    @classmethod
    def merged(cls, batches: Sequence[DecodedBatch]) -> DecodedBatch:
        """The batches as one (poll order kept, so each partition stays in offset order)."""
        if len(batches) == 1:
            return batches[0]
        offsets: dict[tuple[str, int], int] = {}
        for batch in batches:
            for key, offset in batch.offsets.items():
                offsets[key] = max(offset, offsets.get(key, offset))
        return cls(
            records=[record for batch in batches for record in batch.records],
            events=pa.concat_tables([batch.events for batch in batches]),
            dead=[letter for batch in batches for letter in batch.dead],
            offsets=offsets,
            generation=batches[-1].generation,
        )


@dataclass
class AppliedTotals:
    """What the stage applied so far (the service's report reads it)."""

    events_applied: int = 0
    duplicates: int = 0
    dead_letters: int = 0


class ApplyStage:
    """Decoded batches in (`put`), state written (see the module docstring)."""

    def __init__(
        self,
        settings: CasmSettings,
        store: StateStore,
        validator: EventValidator,
        dead_letters: DeadLetterPublisher,
        metrics: ServiceMetrics,
        publisher: Publisher,
        serving: ServingModel,
        signals: SignalWatch | None,
        trainer: TrainerLink | ModelFollower,
        events_applied_total: int,
        totals: AppliedTotals,
        changelog: ChangelogWriter | None = None,
        check_conflicts: bool = True,
    ) -> None:
        self.settings = settings
        self.cfg = settings.serve
        self.store = store
        self.validator = validator
        self.dead_letters = dead_letters
        self.metrics = metrics
        self.publisher = publisher
        self.serving = serving
        self.signals = signals
        self.trainer = trainer
        self.changelog = changelog  # scale-out, ingest role: every batch to the changelog first
        self.check_conflicts = check_conflicts  # off for the trainer role: its ingest instances checked
        self.events_applied_total = events_applied_total  # in the store, this run's included
        self.totals = totals  # the service's report: counts of events, duplicates, dead letters
        self.held_back: str | None = None  # why the last batch was not applied (for /healthz)
        self.applied_offsets: dict[tuple[str, int], int] = {}  # the newest applied, for Kafka's commit
        self.rewind_wanted = threading.Event()  # a batch was held back: re-read from the store's offsets
        self._rewind_through = -1  # batches of this generation and older are dropped
        self._queue: deque[DecodedBatch] = deque()
        self._cond = threading.Condition()
        self._working = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._retained_at = time.monotonic()
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ polling-stage side
    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Work on a thread of its own from now on."""
        self._thread = threading.Thread(target=self._loop, name="casm-apply", daemon=True)
        self._thread.start()

    def put(self, batch: DecodedBatch) -> None:
        """Queue a batch; blocks while `serve.apply_queue_batches` wait (backpressure on polling)."""
        with self._cond:
            while self._thread is not None and len(self._queue) >= self.cfg.apply_queue_batches and self.error is None:
                self._cond.wait(self.cfg.poll_timeout_ms / 1000.0)
            self._queue.append(batch)
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        """Whether a batch is queued or being applied."""
        with self._cond:
            return bool(self._queue) or self._working

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued batch is applied (or dropped); False after `timeout_s`."""
        if self._thread is None:
            self.run_inline()
            return True
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._queue or self._working) and self.error is None and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, self.cfg.poll_timeout_ms / 1000.0))
        return True

    def rewound(self) -> None:
        """The polling stage has sought back to the store's offsets: later batches are applied again."""
        self.rewind_wanted.clear()

    def close(self, timeout_s: float) -> None:
        """Apply what is queued, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("the apply stage did not finish within %s s", timeout_s)
        elif self.error is None:
            self.run_inline()

    # ---------------------------------------------------------------------- the work
    def run_inline(self) -> None:
        """Apply every queued batch and do the housekeeping, on the caller's thread."""
        while True:
            batches = self._take()
            if not batches:
                break
            self._apply_batches(batches)
        self.housekeeping()

    def _take(self) -> list[DecodedBatch]:
        """Queued batches, oldest first, up to `apply_max_events` events (at least one batch);
        those of a held-back generation are dropped. Marks the stage working."""
        taken: list[DecodedBatch] = []
        events = 0
        with self._cond:
            while self._queue:
                batch = self._queue[0]
                if batch.generation <= self._rewind_through:
                    self._queue.popleft()
                    continue
                if taken and events + batch.events.num_rows > self.cfg.apply_max_events:
                    break
                taken.append(self._queue.popleft())
                events += batch.events.num_rows
            self._working = bool(taken)
            self._cond.notify_all()
        self.metrics.apply_queue.set(len(self._queue))
        return taken

    def _loop(self) -> None:
        wait_s = self.cfg.poll_timeout_ms / 1000.0
        try:
            while True:
                with self._cond:
                    if not self._queue:
                        if self._closing:
                            return
                        self._cond.wait(wait_s)
                batches = self._take()
                if batches:
                    self._apply_batches(batches)
                self.housekeeping()
        except BaseException as exc:  # noqa: BLE001 - reported to the polling stage, which stops
            log.exception("the apply stage failed")
            self.error = exc
        finally:
            with self._cond:
                self._working = False
                self._cond.notify_all()

    def _apply_batches(self, batches: list[DecodedBatch]) -> None:
        try:
            self.ingest(DecodedBatch.merged(batches))
        finally:
            with self._cond:
                self._working = False
                self._cond.notify_all()

    def ingest(self, batch: DecodedBatch) -> None:
        """Dead letters, conflicts, signals, apply and hand-off of one (merged) batch."""
        started = time.perf_counter()
        events, conflicts = batch.events, []
        stored = self.store.offsets(self.settings.topics.behaviours) if self.check_conflicts or self.changelog is not None else {}
        if self.check_conflicts:
            events, conflicts = split_conflicts(batch.events, self.store, stored, batch.records, self.validator)
        if not self._deliver_dead_letters(batch.dead + conflicts, batch):
            return  # held back: read again, nothing applied
        if conflicts:
            self.metrics.conflicting_duplicates.inc(len(conflicts))
        offsets = batch.offsets
        if self.changelog is not None:
            written = self.changelog.write(events, offsets, stored)
            if written is None:
                self._hold_back(batch, f"the changelog {self.settings.topics.changelog} does not acknowledge: a batch "
                                f"of {len(batch.records)} records is held back and read again")
                return
            offsets = {**offsets, **written}
        version, scorer = self.serving.current  # the model of the batch's moment, for the signals
        result = self.store.apply(events, offsets,
                                  before_width=None if self.signals is None else self.settings.model.max_len)
        self._observe_hits(events, result)  # before the touch: the lists in place are the ones judged
        self.publisher.touch(result.touched_users, time.monotonic())
        if self.signals is not None:
            self.publisher.submit(self.signals.prepare(events, result, scorer if self.cfg.has_model else None,
                                                       version, self.events_applied_total))
        self.trainer.touched(result.touched_users, result.applied)
        self.events_applied_total += result.applied
        self.totals.events_applied += result.applied
        self.totals.duplicates += result.duplicates
        self.applied_offsets = dict(result.offsets)
        self.metrics.count_applied(result.applied)
        if result.duplicates:
            self.metrics.duplicates.inc(result.duplicates)
        self.metrics.batch_seconds.observe(time.perf_counter() - started)

    def _observe_hits(self, events: pa.Table, result: ApplyResult) -> None:
        """The applied target-behaviour events to the published-HR tracker (`publisher.hits`)."""
        hits = getattr(self.publisher, "hits", None)  # (stand-in publishers of tests have none)
        if hits is None or events.num_rows == 0 or result.applied == 0:
            return
        events = events.take(pa.array(result.rows))  # the applied rows (redeliveries and duplicates left out)
        target = events.filter(pc.equal(events.column("behavior"), self.settings.behaviours.target))
        if target.num_rows:
            hits.observe(target.column("user_id").to_pylist(), target.column("item_id").to_pylist())

    def _deliver_dead_letters(self, dead: list[DeadLetter], batch: DecodedBatch | None) -> bool:
        """Send `dead` and wait for the broker's acknowledgements (``kafka.dead_letter_ack_timeout_s``);
        count them once acknowledged. When one is not and `batch` is given, the batch is held
        back: nothing of it is applied, queued batches of its generation are dropped, and the
        polling stage is asked to re-read from the store's offsets (`rewind_wanted`)."""
        if not dead:
            self.held_back = None
            return True
        if wait_all(self.dead_letters.publish(dead), self.settings.kafka.dead_letter_ack_timeout_s):
            for letter in dead:
                self.metrics.dead_letters.labels(letter.kind).inc()
            self.totals.dead_letters += len(dead)
            self.held_back = None
            return True
        if batch is None:
            return False
        self._hold_back(batch, f"dead letters cannot be delivered to {self.settings.topics.dead_letters}: a batch "
                        f"of {len(batch.records)} records is held back and read again")
        self.metrics.dead_letter_holds.inc()
        return False

    def _hold_back(self, batch: DecodedBatch, reason: str) -> None:
        """Apply nothing of `batch`, drop the queued batches of its generation and ask the polling
        stage to re-read from the store's offsets."""
        self.held_back = reason
        log.warning("%s", reason)
        with self._cond:
            self._rewind_through = max(self._rewind_through, batch.generation)
        self.rewind_wanted.set()

    # ------------------------------------------------------------------- housekeeping
    def trainer_step(self, wait_publisher: Callable[[], None] | None = None) -> None:
        """Swap in a trained version, then feed the trainer (continuous mode) or run a round when
        one is due (deterministic mode: after `wait_publisher`, so the lists of the batch before
        are out first)."""
        if not self.trainer.ready():
            return
        self.trainer.collect()
        if not self.cfg.has_model:  # the baselines never train
            return
        if self.trainer.round_due():
            if wait_publisher is not None:
                wait_publisher()
            self.trainer.run_round(self.events_applied_total)
        else:
            self.trainer.maybe_feed(self.events_applied_total)

    def housekeeping(self) -> None:
        """The periodic work of the state's owner: drift state saved, retention."""
        if self._thread is not None:
            self.trainer_step()
        if self.signals is not None:
            self.signals.maybe_persist()
        if time.monotonic() - self._retained_at >= self.cfg.retain_every_s:
            self._retained_at = time.monotonic()
            if trimmed := self.store.retention.retain():
                log.info("retention trimmed %d applied events", trimmed)

    def describe(self) -> dict[str, Any]:
        """For /healthz."""
        with self._cond:
            return {"apply_queue_batches": len(self._queue), "apply_ok": self.error is None}
