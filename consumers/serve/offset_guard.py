"""Offsets out of range are never silent.

The service reads each partition from the offset its state store holds. When that offset is above
the partition's high watermark (the topic was deleted and recreated, the embedded broker restarted
with empty topics, the cluster was replaced) or below its log start (retention removed what we had
not read), Kafka's own reset would silently skip or re-read records. After every poll `check`
compares each assigned partition's position with the high watermark of the fetch responses (the
embedded broker's end offsets are wrong; the high watermark is right), and `on_error` takes
kafka-python's ``OffsetOutOfRangeError`` (the consumer runs with ``auto_offset_reset='none'``, so
the client never resets by itself). Either way the partition is reported (an error line naming
topic, partition, the stored offset and the log's range; the gauge ``casm_offset_out_of_range``;
`/healthz`) and then, by ``kafka.offset_out_of_range``:

* ``fail`` (default): consumption of the partition stops (paused) until an operator acts (restores
  the topic, or restarts with ``reset-earliest``); nothing is applied from it, nothing is lost.
* ``reset-earliest``: the store's offset of the partition is reset to the log start (recorded in
  the store's ``offset_resets``) and the partition is read from there. Scale-out, ingest role: a
  reset forward is first written to the changelog (`before_reset`: an empty record from the
  stored offset to the log start, acknowledged), so that its readers' chain stays whole; when
  that cannot be done, the partition is stopped as under ``fail``. So is a reset backward (a
  recreated topic, offsets counted again from 0): the changelog's readers could not tell its
  records from repeats; with scale-out, replay the log into fresh files instead.

Under ``fail`` a stopped partition stays stopped for the life of the process, across reassignments.
Known limit: a recreated partition that has already received more records than our stored offset
by the time the service first fetches from it (e.g. a service started after the new log grew) looks
in range, and the records below the stored offset are not read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from consumers.telemetry import ServiceMetrics
from state.store import StateStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutOfRange:
    """A partition whose stored offset is outside its log."""

    topic: str
    partition: int
    stored: int
    log_start: int | None
    high_watermark: int | None

    def describe(self) -> str:
        start = "?" if self.log_start is None else self.log_start
        high = "?" if self.high_watermark is None else self.high_watermark
        return (f"{self.topic}[{self.partition}]: stored offset {self.stored} is outside the partition's log "
                f"[{start}, {high})")


class OffsetGuard:
    """Checks the consumer's positions against the partitions' logs (see the module doc)."""

    def __init__(self, consumer: KafkaConsumer, store: StateStore, policy: str, metrics: ServiceMetrics,
                 before_reset: Callable[[str, int, int], bool] | None = None) -> None:
        """`before_reset(topic, partition, to_offset)`: called before a ``reset-earliest`` reset;
        False stops the partition instead (see the module docstring)."""
        self.consumer = consumer
        self.store = store
        self.policy = policy
        self.metrics = metrics
        self.before_reset = before_reset
        self.stopped: dict[TopicPartition, OutOfRange] = {}
        self.resets: list[OutOfRange] = []

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """A new assignment (e.g. after the group re-formed on a restarted broker): a partition
        stopped before stays stopped for the life of this process, even if its new log has grown
        past the stored offset meanwhile (it would look in range and skip what lies below)."""
        held = [tp for tp in partitions if tp in self.stopped]
        if held:
            self.consumer.pause(*held)

    def check(self) -> None:
        """Compare every assigned, running partition's position with its high watermark."""
        for tp in self.consumer.assignment():
            if tp in self.stopped:
                continue
            high = self.consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self.consumer.position(tp, timeout_ms=0)
            except KafkaError:
                continue
            if position is not None and position > high:
                self._out_of_range(OutOfRange(tp.topic, tp.partition, int(position), None, int(high)))

    def on_error(self, exc: KafkaError) -> None:
        """kafka-python's OffsetOutOfRangeError (its first argument maps partitions to offsets)."""
        found = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
        if not found:
            raise exc
        for tp, offset in found.items():
            start = high = None
            try:
                start = self.consumer.beginning_offsets([tp]).get(tp)
            except KafkaError as err:
                log.debug("log start of %s unknown: %s", tp, err)
            high = self.consumer.highwater(tp)
            self._out_of_range(OutOfRange(tp.topic, tp.partition, int(offset), start, high))

    def _out_of_range(self, found: OutOfRange) -> None:
        tp = TopicPartition(found.topic, found.partition)
        start = found.log_start or 0
        if self.policy == "reset-earliest":
            if self.before_reset is None or self.before_reset(found.topic, found.partition, start):
                log.error("offset out of range: %s; kafka.offset_out_of_range=reset-earliest: reading the "
                          "partition's new log from offset %d (the reset is recorded in the store)",
                          found.describe(), start)
                self.store.reset_offset(found.topic, found.partition, start, f"out of range: {found.describe()}")
                self.consumer.seek(tp, start)
                self.metrics.offset_resets.labels(found.topic, str(found.partition)).inc()
                self.resets.append(found)
                return
            log.error("offset out of range: %s; the reset to offset %d could not be written to the changelog "
                      "first: consumption of the partition is stopped", found.describe(), start)
        else:
            log.error("offset out of range: %s; kafka.offset_out_of_range=fail: consumption of the partition is "
                      "stopped (restore the topic, or restart with --kafka.offset-out-of-range reset-earliest to "
                      "read its new log from the start)", found.describe())
        self.consumer.pause(tp)
        self.stopped[tp] = found
        self.metrics.offset_out_of_range.labels(found.topic, str(found.partition)).set(1)

    @property
    def problems(self) -> list[str]:
        """What /healthz reports: every stopped partition."""
        return [f"offset out of range: {found.describe()} (consumption stopped)" for found in self.stopped.values()]
