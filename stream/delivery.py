"""Acknowledged produce: nothing counts as delivered before the broker says so.

`AcknowledgedProducer` wraps a kafka-python ``KafkaProducer`` built by a factory. Every ``send``
is tracked until the broker acknowledges it; a failed send is sent again after a backoff
(``kafka.delivery_backoff_ms``, doubling up to ``kafka.delivery_backoff_max_ms``) up to
``kafka.delivery_retries`` times, then its owner's ``on_fail`` is called. A producer that has
had a record unacknowledged for ``kafka.delivery_stall_s`` with no acknowledgement since (what
kafka-python's idempotent producer does after the broker lost its producer ids: it retries
forever) is closed and a new one is built; its records go to the retries.

Callbacks (``on_ack(metadata)``, ``on_fail(exc)``) run on the producer's I/O thread or on the
wrapper's own maintenance thread: keep them short and never produce from them. ``send`` returns
an `Outcome` that can be waited for. `health()` says whether outputs are being delivered and, when
not, why; `stats()` holds sent / acknowledged / failed per topic. The wrapper also behaves as a
plain ``send(topic, key=, value=)`` / ``flush`` / ``close`` producer, so code written for a
``KafkaProducer`` keeps working and is counted too.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError, MessageSizeTooLargeError

from stream.config import KafkaConfig

log = logging.getLogger(__name__)

MAINTENANCE_PERIOD_S = 0.05
"""How often the maintenance thread sends due retries and checks for a stuck producer (s)."""

NOT_RETRIABLE = (MessageSizeTooLargeError,)
"""Errors a resend cannot fix (the owner must change the record)."""

OnAck = Callable[[Any], None]
OnFail = Callable[[BaseException], None]


class Outcome:
    """The result of one tracked send: wait for it, then read ``ok`` / ``error`` / ``metadata``."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.ok = False
        self.error: BaseException | None = None
        self.metadata: Any = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` seconds; True when acknowledged."""
        self._done.wait(timeout_s)
        return self.ok

    def _finish(self, ok: bool, value: Any) -> None:
        self.ok = ok
        if ok:
            self.metadata = value
        else:
            self.error = value
        self._done.set()


def wait_all(outcomes: Iterable[Outcome], timeout_s: float) -> bool:
    """Wait up to `timeout_s` seconds in all for every outcome; True when all were acknowledged."""
    deadline = time.monotonic() + timeout_s
    for outcome in outcomes:
        if not outcome.wait(max(0.0, deadline - time.monotonic())):
            return False
    return True


@dataclass
class _Record:
    topic: str
    key: bytes | None
    value: bytes | None
    on_ack: OnAck | None
    on_fail: OnFail | None
    partition: int | None = None  # None: the producer's partitioner (by key)
    headers: list[tuple[str, bytes]] | None = None
    outcome: Outcome = field(default_factory=Outcome)
    attempts: int = 0  # sends so far
    token: int = 0  # which send the pending callback belongs to (older ones are ignored)
    sent_at: float = 0.0  # monotonic time of the current send
    producer: Any = None  # the producer of the current send


class AcknowledgedProducer:
    """A producer whose every record is tracked to its acknowledgement (thread-safe)."""

    def __init__(self, factory: Callable[[], KafkaProducer], cfg: KafkaConfig) -> None:
        self._factory = factory
        self.cfg = cfg
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._producer: KafkaProducer | None = factory()
        self._tokens = itertools.count(1)
        self._in_flight: dict[int, _Record] = {}  # token -> record
        self._retries: list[tuple[float, int, _Record]] = []  # heap of (due, seq, record)
        self._seq = itertools.count()
        self.sent: Counter[str] = Counter()
        self.acknowledged: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()  # sends that failed (each attempt)
        self.given_up: Counter[str] = Counter()  # records whose owner was told they failed
        self.rebuilds = 0
        self._last_ack = time.monotonic()
        self._last_error: str | None = None
        self._failing_since: float | None = None
        self._closed = False
        self._broken: str | None = None  # why the producer must be rebuilt
        self._rebuilding = threading.Event()
        self._thread = threading.Thread(target=self._maintain, name="casm-delivery", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- sending
    def send(
        self,
        topic: str,
        key: bytes | None = None,
        value: bytes | None = None,
        on_ack: OnAck | None = None,
        on_fail: OnFail | None = None,
        *,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Outcome:
        """Send one record (to `partition`, else the key's); `on_ack(metadata)` once the broker
        acknowledged it, `on_fail(exc)` once it failed ``delivery_retries + 1`` times (or cannot be
        sent at all). A retry may overtake a later record: wait for an outcome before sending what
        must follow it."""
        record = _Record(topic, key, value, on_ack, on_fail, partition, headers)
        self._send(record)
        return record.outcome

    def _send(self, record: _Record) -> None:
        with self._lock:
            producer = self._producer
            token = next(self._tokens)
            record.token, record.sent_at = token, time.monotonic()
            record.attempts += 1
            record.producer = producer
            self.sent[record.topic] += 1
            self._in_flight[token] = record
        if producer is None:
            self._errored(record, token, KafkaError("no producer (rebuilding after a failure)"))
            return
        try:
            future = producer.send(record.topic, key=record.key, value=record.value,
                                   partition=record.partition, headers=record.headers)
        except Exception as exc:  # noqa: BLE001 - a send that cannot start is a failed send
            self._errored(record, token, exc)
            return
        future.add_callback(self._acked, record, token)
        future.add_errback(self._errored, record, token)

    def _acked(self, record: _Record, token: int, metadata: Any) -> None:
        with self._lock:
            if self._in_flight.pop(token, None) is None:
                return  # a stale callback of a record already handed to a retry
            self.acknowledged[record.topic] += 1
            self._last_ack = time.monotonic()
            self._failing_since = None
            self._idle.notify_all()
        if record.on_ack is not None:
            try:
                record.on_ack(metadata)
            except Exception:  # noqa: BLE001 - an owner's bug must not kill the I/O thread
                log.exception("on_ack callback failed")
        record.outcome._finish(True, metadata)

    def _errored(self, record: _Record, token: int, exc: BaseException) -> None:
        with self._lock:
            if self._in_flight.pop(token, None) is None:
                return
            self.failed[record.topic] += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            if _is_fatal(record.producer):
                # Not the record's fault: the producer is broken; rebuild it and do not count this try.
                record.attempts -= 1
                self._broken = f"producer in a fatal state: {exc}"
            final = self._closed or isinstance(exc, NOT_RETRIABLE) or record.attempts > self.cfg.delivery_retries
            if not final:
                backoff_ms = min(self.cfg.delivery_backoff_ms * 2 ** (record.attempts - 1),
                                 self.cfg.delivery_backoff_max_ms)
                heapq.heappush(self._retries, (time.monotonic() + backoff_ms / 1000.0, next(self._seq), record))
                log.debug("send to %s failed (attempt %d, %s); retrying in %d ms",
                          record.topic, record.attempts, exc, backoff_ms)
                return
            self.given_up[record.topic] += 1
            self._idle.notify_all()
        log.warning("a record for %s was not delivered after %d attempts: %s", record.topic, record.attempts, exc)
        if record.on_fail is not None:
            try:
                record.on_fail(exc)
            except Exception:  # noqa: BLE001
                log.exception("on_fail callback failed")
        record.outcome._finish(False, exc)

    # ------------------------------------------------------------------------ maintenance
    def _maintain(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now = time.monotonic()
                due = []
                while self._retries and self._retries[0][0] <= now:
                    due.append(heapq.heappop(self._retries)[2])
                stuck = self._stuck(now) or self._broken
                self._broken = None
            for record in due:
                self._send(record)
            if (stuck or self._producer is None) and not self._rebuilding.is_set():
                self._rebuilding.set()  # built on a thread of its own: a factory may block (bootstrap)
                threading.Thread(target=self._rebuild, args=(stuck,), name="casm-delivery-rebuild",
                                 daemon=True).start()
            time.sleep(MAINTENANCE_PERIOD_S)

    def _stuck(self, now: float) -> str | None:
        """Why the producer counts as stuck, or None. Caller holds the lock."""
        if not self._in_flight or now - self._last_ack < self.cfg.delivery_stall_s:
            return None
        oldest = min(r.sent_at for r in self._in_flight.values())
        if now - oldest < self.cfg.delivery_stall_s:
            return None
        return f"{len(self._in_flight)} records unacknowledged for {now - oldest:.0f} s"

    def _rebuild(self, reason: str | None) -> None:
        """Close the current producer (its records go to the retries) and build a new one."""
        try:
            self._rebuild_now(reason)
        finally:
            self._rebuilding.clear()

    def _rebuild_now(self, reason: str | None) -> None:
        with self._lock:
            old, self._producer = self._producer, None
            stale = list(self._in_flight.items())
        if old is not None:
            log.warning("producer cannot deliver (%s; last error: %s): closing it and building a new one",
                        reason, self._last_error)
            _force_close(old)
        for token, record in stale:
            self._errored(record, token, KafkaError(f"producer rebuilt: {reason}"))
        try:
            producer = self._factory()
        except Exception as exc:  # noqa: BLE001 - the broker may be away; try again later
            with self._lock:
                self._last_error = f"building a producer failed: {type(exc).__name__}: {exc}"
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
            log.warning("%s; retrying", self._last_error)
            time.sleep(self.cfg.delivery_backoff_max_ms / 1000.0)
            return
        with self._lock:
            if self._closed:
                producer.close(timeout=0)
                return
            self._producer = producer
            self._last_ack = time.monotonic()  # the new producer gets a full stall period
            self.rebuilds += 1
        log.info("built a new producer (rebuild %d)", self.rebuilds)

    # ------------------------------------------------------------------------ reporting
    @property
    def backlog(self) -> int:
        """Records sent but neither acknowledged nor given up (in flight or waiting to retry)."""
        with self._lock:
            return len(self._in_flight) + len(self._retries)

    def health(self) -> tuple[bool, str]:
        """(delivering, reason): not delivering while sends fail with no acknowledgement since,
        or a record has waited ``delivery_stall_s`` for its acknowledgement."""
        with self._lock:
            now = time.monotonic()
            stuck = self._stuck(now)
            if stuck:
                return False, f"outputs cannot be delivered: {stuck}; last error: {self._last_error}"
            if self._failing_since is not None:
                return False, (f"outputs cannot be delivered: sends failing for {now - self._failing_since:.1f} s "
                               f"({len(self._retries)} waiting to retry); last error: {self._last_error}")
            return True, "ok"

    def stats(self) -> dict[str, dict[str, int]]:
        """Counts per topic: sent (attempts), acknowledged, failed (attempts), given_up (records)."""
        with self._lock:
            return {name: dict(getattr(self, name)) for name in ("sent", "acknowledged", "failed", "given_up")}

    # --------------------------------------------------------------------- KafkaProducer-like
    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to `timeout` seconds (None: forever) until nothing is in flight or waiting to
        retry; True when all of it was settled (acknowledged or given up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            producer = self._producer
        if producer is not None:
            try:
                producer.flush(timeout=timeout)
            except KafkaError:
                pass
        with self._lock:
            while self._in_flight or self._retries:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._idle.wait(MAINTENANCE_PERIOD_S if left is None else min(left, MAINTENANCE_PERIOD_S))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Flush for up to `timeout` seconds, then close; what is left is never acknowledged (its
        owners were not told it was delivered, so nothing counts it)."""
        settled = self.flush(timeout)
        with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
            left = len(self._in_flight) + len(self._retries)
        if not settled:
            log.warning("closing the producer with %d records unacknowledged", left)
        self._thread.join(timeout=1.0)
        if producer is not None:
            if settled:
                try:
                    producer.close(timeout=timeout)
                    return
                except Exception as exc:  # noqa: BLE001
                    log.debug("closing the producer: %s", exc)
            _force_close(producer)


def _is_fatal(producer: Any) -> bool:
    """Whether kafka-python's `producer` is in a fatal (idempotence / transaction) state, in which it
    fails every send until it is replaced."""
    manager = getattr(producer, "_transaction_manager", None)
    try:
        return bool(manager is not None and manager.has_fatal_error())
    except Exception:  # noqa: BLE001 - a private API: be defensive
        return False


def _force_close(producer: KafkaProducer) -> None:
    """Close `producer` now, failing what it still holds (kafka-python's ``close(0)`` raises
    before it gets to its force-close when batches are incomplete)."""
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
    try:
        producer.close(timeout=0)
    except Exception as exc:  # noqa: BLE001 - it is being thrown away
        log.debug("closing a producer: %s", exc)


def acknowledged_producer(cfg: KafkaConfig, bootstrap: str, make: Callable[..., KafkaProducer]) -> AcknowledgedProducer:
    """An `AcknowledgedProducer` whose producers `make(cfg, bootstrap, ...)` builds with
    ``max_block_ms`` and ``max_request_size`` from `cfg`."""
    return AcknowledgedProducer(
        lambda: make(cfg, bootstrap, max_block_ms=cfg.max_block_ms, max_request_size=cfg.max_request_size),
        cfg,
    )
