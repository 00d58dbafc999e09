"""Dead letters: every message of `behaviours` that does not parse or validate is produced to the
dead-letter topic (``behaviours.dlq``) with the reason, counted once the broker acknowledged it,
and the consumer moves on.

`decode_behaviours` makes the `DeadLetter`s (the original value and key cut to bounds, their
sizes and SHA-256 kept); `DeadLetterPublisher` sends them keyed by the original message's (cut)
key, so a user's rejects stay together, through an `AcknowledgedProducer`. A dead letter still
larger than the producer's request limit is cut further to fit (`fit`). ``publish`` returns the
delivery outcomes: the ingest loop waits for them and holds its batch back (applies nothing,
reads it again) when one was not acknowledged, so a bad message is never lost with its offset
recorded. ``counts`` holds the acknowledged ones per kind, ``failed`` those given up.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable

from stream.delivery import AcknowledgedProducer, Outcome
from stream.models import DeadLetter

log = logging.getLogger(__name__)

RECORD_OVERHEAD_BYTES = 512
"""Room left in a request for the record batch header, the record's framing and headers (bytes)."""

BASE64_DIGITS_PER_3_BYTES = 4


def fit(letter: DeadLetter, max_record_bytes: int) -> DeadLetter:
    """`letter`, with its `original` cut so that key + JSON value fit in `max_record_bytes` (the
    producer's ``max_request_size``) with `RECORD_OVERHEAD_BYTES` to spare; the cut is recorded
    (``truncated``; ``original_size`` and ``original_sha256`` describe the whole value)."""
    budget = max_record_bytes - RECORD_OVERHEAD_BYTES - len(letter.key or b"")
    size = len(letter.to_json_bytes())
    if size <= budget:
        return letter
    without = len(letter.model_copy(update={"original": b""}).to_json_bytes())
    keep = max(0, (budget - without) * 3 // BASE64_DIGITS_PER_3_BYTES - 3)
    cut = letter.model_copy(update={"original": letter.original[:keep], "truncated": True})
    log.debug("dead letter %s[%d]@%d of %d bytes cut to %d", letter.topic, letter.partition, letter.offset,
              size, len(cut.to_json_bytes()))
    return cut


class DeadLetterPublisher:
    """Sends dead letters to `topic`; ``counts`` holds how many of each kind the broker acknowledged,
    ``failed`` how many could not be delivered (after the producer's retries)."""

    def __init__(self, producer: AcknowledgedProducer, topic: str, max_record_bytes: int | None = None) -> None:
        self.producer = producer
        self.topic = topic
        self.max_record_bytes = max_record_bytes if max_record_bytes is not None else producer.cfg.max_request_size
        self.counts: Counter[str] = Counter()
        self.failed = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Dead letters acknowledged so far."""
        with self._lock:
            return sum(self.counts.values())

    def _acked(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def _on_error(self, letter: DeadLetter, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
        log.error("dead letter of %s[%d]@%d could not be delivered to %s: %s",
                  letter.topic, letter.partition, letter.offset, self.topic, exc)

    def publish(self, dead: Iterable[DeadLetter]) -> list[Outcome]:
        """Send `dead` (asynchronously); the outcomes say when each was acknowledged or given up."""
        outcomes = []
        for letter in dead:
            letter = fit(letter, self.max_record_bytes)
            outcomes.append(self.producer.send(
                self.topic, key=letter.key, value=letter.to_json_bytes(),
                on_ack=lambda _meta, kind=letter.kind: self._acked(kind),
                on_fail=lambda exc, letter=letter: self._on_error(letter, exc),
            ))
            log.debug("dead letter %s[%d]@%d (%s): %s", letter.topic, letter.partition, letter.offset,
                      letter.kind, letter.reason)
        return outcomes

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every dead letter handed over so far is acknowledged (or given up)."""
        return self.producer.flush(timeout=timeout_s)
