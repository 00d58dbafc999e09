"""A zombie's file: an ingest instance paused past its session timeout commits a batch of a
partition that has meanwhile moved on. Its file is then no prefix of the partition's changelog;
when the partition comes back to it, the restore sees the broken chain, releases the partition
and rebuilds it from the changelog's start (every event once), instead of resuming from its own
record and missing what the other owner wrote before it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from consumers.serve.changelog_writer import ChangelogWriter
from consumers.serve.partition_state import PartitionStates
from consumers.serve.service import open_store
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from stream.clients import make_producer
from stream.decode import DECODED_SCHEMA
from stream.delivery import acknowledged_producer
from stream.testing import unique_topics
from stream.topics import ensure_topics

pytestmark = pytest.mark.integration

EVENTS = 40


class StubPublisher:
    """What `PartitionStates` asks of the publisher: nothing pending, users to refresh noted."""

    def __init__(self) -> None:
        self.touched: set[str] = set()

    def wait_idle(self, timeout_s: float) -> bool:
        return True

    def forget(self, users: list[str]) -> None: ...

    def touch(self, users: list[str], when: float) -> None:
        self.touched.update(users)


def decoded(topic: str, start: int, end: int) -> pa.Table:
    """Events at input offsets start..end-1 of partition 0, as `stream.decode` makes them."""
    offsets = np.arange(start, end, dtype=np.int64)
    n = offsets.size
    return pa.table({
        "user_id": [f"u{o % 7}" for o in offsets], "item_id": [f"i{o % 11}" for o in offsets],
        "behavior": ["pv"] * n, "timestamp": offsets.astype(float), "event_id": [f"e{o}" for o in offsets],
        "topic": [topic] * n, "partition": pa.array(np.zeros(n, np.int32)), "offset": pa.array(offsets),
        "produced_ms": pa.array(np.ones(n, np.int64)),
    }, schema=DECODED_SCHEMA)


def test_a_zombies_file_is_rebuilt_from_the_changelog_start(kafka_bootstrap: str, kafka_config, tmp_path: Path) -> None:
    topics = unique_topics("gap", partitions=1)
    settings = CasmSettings(kafka=kafka_config, topics=topics, progress=False)
    settings.kafka.bootstrap_servers = kafka_bootstrap
    settings.store.path = tmp_path / "zombie.duckdb"
    ensure_topics(kafka_bootstrap, settings.kafka, topics)
    source, changelog = topics.behaviours, topics.changelog
    producer = acknowledged_producer(settings.kafka, kafka_bootstrap, make_producer)
    writer = ChangelogWriter(settings, producer, ServiceMetrics(10.0))
    metrics = ServiceMetrics(10.0)
    try:
        def write(start: int, end: int) -> int:
            """The records of input offsets start..end-1 by a writer whose state was at `start`."""
            written = writer.write(decoded(source, start, end), {(source, 0): end}, {0: start})
            assert written is not None
            return written[(changelog, 0)]

        write(0, 10)  # the instance, owner of partition 0
        write(10, 25)  # it pauses; the partition's new owner restores 0..9 and writes 10..24
        zombie_next = write(10, 15)  # the instance wakes up and writes the batch it had in hand ...
        with open_store(settings) as store:
            # ... and commits it on top of its own 0..9: a file that lacks 15..24.
            store.apply(decoded(source, 0, 15), {(source, 0): 15, (changelog, 0): zombie_next})
            write(25, EVENTS)  # the owner goes on
            publisher = StubPublisher()
            states = PartitionStates(settings, kafka_bootstrap, store, publisher, metrics)
            try:
                done = states.assigned([0])  # the partition comes back to the instance
            finally:
                states.close()
            rows = store.con.execute('SELECT "offset", event_id FROM events WHERE topic = $1 ORDER BY "offset"',
                                     [source]).fetchall()
            assert rows == [(o, f"e{o}") for o in range(EVENTS)]  # every event once, 15..24 included
            assert store.offsets(source) == {0: EVENTS}
            sequences = store.sequences([f"u{u}" for u in range(7)])
            assert sequences.lengths.sum() == min(EVENTS, 7 * settings.store.sequence_length)
        assert done.restored_events == {0: EVENTS}  # rebuilt whole
        assert metrics.changelog_gaps._value.get() == 1
        assert publisher.touched == {f"u{u}" for u in range(7)}
    finally:
        producer.close(10)
