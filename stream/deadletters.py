"""Dead letters: every message of `behaviours` that does not parse or validate is produced to the
dead-letter topic (``behaviours.dlq``) with the reason, counted, and the consumer moves on.

`decode_behaviours` makes the `DeadLetter`s; `DeadLetterPublisher` sends them keyed by the original
message's key (so a user's rejects stay together) and keeps counts per kind. Publishing never
raises: a dead letter that cannot be sent is logged and counted as failed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from kafka import KafkaProducer

from stream.models import DeadLetter

log = logging.getLogger(__name__)


class DeadLetterPublisher:
    """Sends dead letters to `topic` with `producer`; ``counts`` holds how many of each kind were
    handed over, ``failed`` how many could not be (the producer's own errors)."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self.counts: Counter[str] = Counter()
        self.failed = 0

    @property
    def total(self) -> int:
        """Dead letters published so far."""
        return sum(self.counts.values())

    def _on_error(self, exc: BaseException) -> None:
        self.failed += 1
        log.error("a dead letter could not be delivered to %s: %s", self.topic, exc)

    def publish(self, dead: Iterable[DeadLetter]) -> int:
        """Send `dead` (asynchronously; `flush` waits). Returns how many were handed to the producer."""
        sent = 0
        for letter in dead:
            try:
                future = self.producer.send(self.topic, key=letter.key, value=letter.to_json_bytes())
            except Exception as exc:  # noqa: BLE001 - dead letters must never stop the loop
                self._on_error(exc)
                continue
            future.add_errback(self._on_error)
            self.counts[letter.kind] += 1
            sent += 1
            log.debug(
                "dead letter %s[%d]@%d (%s): %s",
                letter.topic, letter.partition, letter.offset, letter.kind, letter.reason,
            )
        return sent

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every dead letter handed over so far is acknowledged (or failed)."""
        self.producer.flush(timeout=timeout_s)
