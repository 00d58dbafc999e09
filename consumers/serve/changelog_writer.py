"""The ingest role's changelog (scale-out): a batch's state change, acknowledged by the broker
before the store commits it (the Kafka Streams order: changelog produced and flushed, then the
store committed with the input offsets and the changelog's own)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pyarrow as pa

from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from stream.changelog import encode_batch
from stream.decode import DECODED_SCHEMA
from stream.delivery import AcknowledgedProducer, wait_all

log = logging.getLogger(__name__)


class ChangelogWriter:
    """Writes each batch to `topics.changelog` (see `stream.changelog` for the records)."""

    def __init__(self, settings: CasmSettings, producer: AcknowledgedProducer, metrics: ServiceMetrics) -> None:
        self.topic = settings.topics.changelog
        self.source = settings.topics.behaviours
        self.max_events = settings.scale.changelog_max_events
        self.timeout_s = settings.kafka.request_timeout_ms / 1000.0
        self.producer = producer
        self.metrics = metrics

    def write(self, events: pa.Table, offsets: Mapping[tuple[str, int], int],
              stored: Mapping[int, int]) -> dict[tuple[str, int], int] | None:
        """Produce the batch's records and wait for every acknowledgement; returns the changelog's
        next offset per partition written ((changelog topic, p) -> offset), None when a record
        was not acknowledged within ``kafka.request_timeout_ms`` (the batch must not be committed).

        Args:
            events: the batch's valid events (`stream.decode.DECODED_SCHEMA`).
            offsets: next offset per (topic, partition) after the batch.
            stored: the store's next input offset per partition before the batch (where the
                records continue from).
        """
        written: dict[tuple[str, int], int] = {}
        source_offsets = {key: value for key, value in offsets.items() if key[0] == self.source}
        first_offsets = {(self.source, p): o for p, o in stored.items()}
        for records in encode_batch(events, source_offsets, first_offsets, self.max_events):
            outcomes = [self.producer.send(self.topic, key=r.key, value=r.value, partition=r.partition, headers=r.headers)
                        for r in records]
            if not wait_all(outcomes, self.timeout_s):
                log.warning("changelog records to %s were not acknowledged within %.0f s", self.topic, self.timeout_s)
                return None
            for record, outcome in zip(records, outcomes, strict=True):
                key = (self.topic, record.partition)
                written[key] = max(written.get(key, 0), int(outcome.metadata.offset) + 1)
                self.metrics.changelog_bytes.inc(len(record.value))
            self.metrics.changelog_records.inc(len(records))
        return written

    def bridge(self, partition: int, stored: int, to: int) -> bool:
        """Record that input `partition`'s state moves from offset `stored` to `to` without events
        (an offset reset forward past records that retention deleted): one empty record continuing
        the chain (`stream.changelog`); True once acknowledged. Without it every reader would see
        the next record start past its state."""
        return self.write(DECODED_SCHEMA.empty_table(), {(self.source, partition): to}, {partition: stored}) is not None
