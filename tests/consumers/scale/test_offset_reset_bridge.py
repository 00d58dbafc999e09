"""An offset reset forward (retention deleted records never read, ``reset-earliest``) in the
ingest role: written to the changelog first as an empty record bridging the stored offset to the
log start, so the changelog's readers see an unbroken chain; when it cannot be written, the
partition stops instead of resetting."""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from kafka import TopicPartition
from kafka.errors import OffsetOutOfRangeError

from consumers.serve.changelog_writer import ChangelogWriter
from consumers.serve.offset_guard import OffsetGuard
from consumers.serve.service import Service, open_store
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from stream.changelog import ChangelogDecoder
from stream.clients import read_topic
from stream.decode import DECODED_SCHEMA
from stream.delivery import Outcome
from stream.topics import ensure_topics
from tests.consumers.serve.test_service import service_settings

SOURCE = "behaviours"


class RecordingProducer:
    """`AcknowledgedProducer.send` acknowledging at once; keeps the records as a consumer reads them."""

    def __init__(self) -> None:
        self.records: list[SimpleNamespace] = []

    def send(self, topic, key=None, value=None, on_ack=None, on_fail=None, *, partition=None, headers=None) -> Outcome:
        offset = sum(r.partition == partition for r in self.records)
        self.records.append(SimpleNamespace(topic=topic, partition=partition, offset=offset, headers=headers,
                                            value=value))
        outcome = Outcome()
        outcome._finish(True, SimpleNamespace(offset=offset))
        return outcome


def events(start: int, end: int) -> pa.Table:
    offsets = np.arange(start, end, dtype=np.int64)
    n = offsets.size
    return pa.table({
        "user_id": ["u"] * n, "item_id": [f"i{o}" for o in offsets], "behavior": ["pv"] * n,
        "timestamp": offsets.astype(float), "event_id": [f"e{o}" for o in offsets], "topic": [SOURCE] * n,
        "partition": pa.array(np.zeros(n, np.int32)), "offset": pa.array(offsets),
        "produced_ms": pa.array(np.ones(n, np.int64)),
    }, schema=DECODED_SCHEMA)


def test_a_reset_forward_keeps_the_changelog_chain_whole() -> None:
    producer = RecordingProducer()
    writer = ChangelogWriter(CasmSettings(progress=False), producer, ServiceMetrics(10.0))
    assert writer.write(events(0, 10), {(SOURCE, 0): 10}, {0: 0}) is not None
    assert writer.bridge(0, stored=10, to=50)  # offsets 10..49 deleted by retention, never read
    assert writer.write(events(50, 60), {(SOURCE, 0): 60}, {0: 50}) is not None
    decoded = ChangelogDecoder().decode(producer.records)  # no ChangelogGap: the chain is whole
    assert decoded.events.column("offset").to_pylist() == [*range(10), *range(50, 60)]
    assert decoded.offsets[(SOURCE, 0)] == 60


class StubConsumer:
    def __init__(self, log_start: int) -> None:
        self.log_start, self.sought, self.paused = log_start, {}, []

    def beginning_offsets(self, partitions):
        return dict.fromkeys(partitions, self.log_start)

    def highwater(self, tp):
        return self.log_start + 5

    def seek(self, tp, offset):
        self.sought[tp] = offset

    def pause(self, *partitions):
        self.paused.extend(partitions)


@pytest.mark.parametrize("recorded", [True, False])
def test_the_reset_waits_for_its_changelog_record(recorded: bool) -> None:
    tp = TopicPartition(SOURCE, 0)
    store = open_store(CasmSettings(store={"path": ":memory:"}, progress=False))
    store.apply(events(0, 10))
    asked = []

    def before_reset(topic: str, partition: int, to_offset: int) -> bool:
        asked.append((topic, partition, to_offset, store.offsets(topic)[partition]))
        return recorded

    consumer = StubConsumer(log_start=50)
    guard = OffsetGuard(consumer, store, "reset-earliest", ServiceMetrics(10.0), before_reset=before_reset)
    guard.on_error(OffsetOutOfRangeError({tp: 10}))
    assert asked == [(SOURCE, 0, 50, 10)]  # asked before the store's offset moved
    if recorded:
        assert store.offsets(SOURCE)[0] == 50 and consumer.sought == {tp: 50} and not guard.stopped
    else:  # the reset could not be recorded: the partition stops, nothing moves
        assert store.offsets(SOURCE)[0] == 10 and consumer.paused == [tp] and tp in guard.stopped
    store.close()


@pytest.mark.integration
def test_an_ingest_service_bridges_a_reset_forward_and_refuses_one_backward(
        kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path) -> None:
    settings = service_settings(tmp_path, kafka_config, topic_names, training="continuous")
    settings.scale.role = "ingest"
    # A group of its own: this service stops while still joining, and the embedded broker can keep
    # such a member in the group (later services of the shared test group would wait on it).
    settings.kafka.group_id = f"bridge-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    source = settings.topics.behaviours
    service = Service(settings, kafka_bootstrap)
    try:
        decoded = events(0, 10).set_column(5, "topic", pa.array([source] * 10))
        service.store.apply(decoded, {(source, 0): 10})
        assert service._bridge_reset(source, 0, 50)  # forward: one empty record 10 -> 50
        assert not service._bridge_reset(source, 0, 3)  # backward: refused (the partition stops)
        assert service._bridge_reset(source, 0, 10)  # nowhere: nothing to record
    finally:
        service.run(until=lambda s: True)  # runs the shutdown path
    records = read_topic(settings.kafka, kafka_bootstrap, settings.topics.changelog, timeout_s=30)
    headers = [dict(r.headers) for r in records]
    assert [(h["source.first_offset"], h["source.next_offset"]) for h in headers] == [(b"10", b"50")]
    assert [r.partition for r in records] == [0]
