"""Integration tests on the session's Kafka (the embedded broker on our machines): topics, round
trip, per-user order, dead letters for garbage, replay of a log file, seeking on assignment."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition
from kafka.errors import KafkaError

from stream.clients import lag, make_consumer, make_producer, read_topic, topic_partitions
from stream.config import EventLimits, SyntheticConfig
from stream.deadletters import DeadLetterPublisher
from stream.decode import EventValidator, decode_behaviours
from stream.delivery import acknowledged_producer, wait_all
from stream.logs import read_log
from stream.models import DeadLetter
from stream.replay import replay
from stream.synthetic import generate
from stream.testing import kafka_test_config, unique_topics
from stream.topics import create_topics, ensure_topics

from .garbage import EXPECTED_KINDS, NOW, VOCAB, encode, garbage, valid_fields

pytestmark = pytest.mark.integration

VALIDATOR = EventValidator(EventLimits(), VOCAB)


def test_ensure_topics_is_idempotent(kafka_bootstrap, kafka_config, topic_names):
    first = ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    assert first == {
        topic_names.behaviours: 4, topic_names.recommendations: 4, topic_names.dead_letters: 4,
        topic_names.scores: 4, topic_names.changelog: 4, topic_names.models: 1, topic_names.status: 1,
    }
    assert ensure_topics(kafka_bootstrap, kafka_config, topic_names) == first
    # An existing topic keeps its partitions even when asked for others (never changed).
    assert create_topics(kafka_bootstrap, kafka_config, [topic_names.behaviours], 2) == {topic_names.behaviours: 4}


def test_round_trip_and_order_per_user(kafka_bootstrap, kafka_config, topic_names):
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    stream = generate(SyntheticConfig(n_events=3_000, n_users=50, n_items=200, seed=11))
    producer = make_producer(kafka_config, kafka_bootstrap)
    try:
        report = replay(stream.events, producer, topic_names.behaviours, source_name="rt", progress=False)
    finally:
        producer.close()
    assert (report.sent, report.failed) == (3_000, 0)

    records = read_topic(kafka_config, kafka_bootstrap, topic_names.behaviours, expected=3_000)
    table, dead = decode_behaviours(records, VALIDATOR)
    assert dead == [] and table.num_rows == 3_000

    source = stream.events.to_pylist()
    by_id = {row["event_id"]: row for row in table.to_pylist()}
    assert sorted(by_id) == sorted(f"rt:{i}" for i in range(3_000))
    for i, row in enumerate(source):
        got = by_id[f"rt:{i}"]
        assert (got["user_id"], got["item_id"], got["behavior"], got["timestamp"]) == tuple(row.values())

    # Every user lives on one partition, and reading that partition in offset order gives the
    # user's events in the order they were produced.
    partitions: dict[str, set[int]] = defaultdict(set)
    read_order: dict[str, list[int]] = defaultdict(list)
    for row in sorted(table.to_pylist(), key=lambda r: (r["partition"], r["offset"])):
        partitions[row["user_id"]].add(row["partition"])
        read_order[row["user_id"]].append(int(row["event_id"].split(":")[1]))
    assert all(len(p) == 1 for p in partitions.values())
    assert len({next(iter(p)) for p in partitions.values()}) > 1  # users are spread out
    for user, rows in read_order.items():
        assert rows == sorted(rows), user


def _dlq_pipeline(bootstrap, cfg, topics, messages):
    """Produce `messages` (value or None), decode them, dead-letter the bad ones, read the DLQ."""
    producer = make_producer(cfg, bootstrap)
    try:
        for i, value in enumerate(messages):
            producer.send(topics.behaviours, key=b"key-%d" % (i % 7), value=value)
        producer.flush()
        records = read_topic(cfg, bootstrap, topics.behaviours, expected=len(messages))
        table, dead = decode_behaviours(records, VALIDATOR, now=NOW)
        acknowledged = acknowledged_producer(cfg, bootstrap, make_producer)
        publisher = DeadLetterPublisher(acknowledged, topics.dead_letters)
        assert wait_all(publisher.publish(dead), 30)
        acknowledged.close(5)
        assert publisher.failed == 0 and publisher.total == len(dead)
    finally:
        producer.close()
    letters = [DeadLetter.model_validate_json(r.value) for r in
               read_topic(cfg, bootstrap, topics.dead_letters, expected=len(dead))] if dead else []
    return records, table, dead, letters


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    batch=st.lists(
        st.one_of(valid_fields.map(lambda f: ("valid", encode(f))), garbage), min_size=20, max_size=60
    ).filter(lambda b: any(label != "valid" for label, _ in b) and any(label == "valid" for label, _ in b))
)
def test_dead_letter_queue_gets_every_malformed_message(kafka_bootstrap, batch):
    cfg, topics = kafka_test_config(), unique_topics("dlq")
    ensure_topics(kafka_bootstrap, cfg, topics)
    records, table, dead, letters = _dlq_pipeline(kafka_bootstrap, cfg, topics, [v for _, v in batch])

    # Map each record back to what we sent: the producer keeps order per key, so the n-th record
    # with key k on its partition is the n-th message sent with key k.
    sent_by_key: dict[bytes, list[int]] = defaultdict(list)
    for i in range(len(batch)):
        sent_by_key[b"key-%d" % (i % 7)].append(i)
    seen: dict[bytes, int] = defaultdict(int)
    index_of: dict[tuple[int, int], int] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        index_of[(record.partition, record.offset)] = sent_by_key[record.key][seen[record.key]]
        seen[record.key] += 1

    valid = sorted(i for i, (label, _) in enumerate(batch) if label == "valid")
    got_valid = sorted(index_of[(r["partition"], r["offset"])] for r in table.to_pylist())
    assert got_valid == valid, "every valid message around the garbage arrives"

    assert len(letters) == len(batch) - len(valid)
    assert {(d.partition, d.offset) for d in letters} == {(d.partition, d.offset) for d in dead}
    for letter in letters:
        label, value = batch[index_of[(letter.partition, letter.offset)]]
        assert label != "valid"
        assert letter.kind in EXPECTED_KINDS[label] and letter.reason
        assert letter.topic == topics.behaviours and letter.key.startswith(b"key-")
        original = value or b""
        assert letter.original == original[: EventLimits().dead_letter_max_bytes]
        assert letter.original_size == len(original)


def test_dead_letters_are_keyed_by_the_original_key(kafka_bootstrap, kafka_config, topic_names):
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    _, _, _, letters = _dlq_pipeline(
        kafka_bootstrap, kafka_config, topic_names, [b"not json", None, b"x" * 100_000]
    )
    assert sorted(d.kind for d in letters) == ["empty", "invalid_json", "too_large"]
    big = next(d for d in letters if d.kind == "too_large")
    assert big.truncated and big.original_size == 100_000 and len(big.original) == 64 * 1024
    records = read_topic(kafka_config, kafka_bootstrap, topic_names.dead_letters, expected=3)
    assert sorted(r.key for r in records) == [b"key-0", b"key-1", b"key-2"]


def test_replay_sends_exactly_the_rows_of_a_log_file(kafka_bootstrap, kafka_config, topic_names, tmp_path):
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    path = tmp_path / "log.csv"
    lines = ["user_id,item_id,behavior,timestamp,extra"]
    for i in range(400):
        # Ties in time, ids with commas and non-ASCII text, the file unsorted.
        user = f'"u,{i % 13}"' if i % 5 == 0 else f"ü{i % 13}"
        lines.append(f"{user},item-{i % 37},{VOCAB[i % 4]},{1_650_000_000 + (i * 7919) % 97}.25,x")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    loaded = read_log(path, "generic")

    producer = make_producer(kafka_config, kafka_bootstrap)
    try:
        report = replay(loaded.events, producer, topic_names.behaviours, source_name="log.csv", progress=False)
    finally:
        producer.close()
    assert (report.events, report.sent, report.failed) == (400, 400, 0)

    records = read_topic(kafka_config, kafka_bootstrap, topic_names.behaviours, expected=400)
    assert len(records) == 400  # nothing more
    table, dead = decode_behaviours(records, VALIDATOR)
    assert dead == []
    rows = sorted(table.to_pylist(), key=lambda r: int(r["event_id"].split(":")[1]))
    sent = [(r["user_id"], r["item_id"], r["behavior"], r["timestamp"]) for r in rows]
    assert sent == [tuple(r.values()) for r in loaded.events.to_pylist()]
    assert all(r.key == json.loads(r.value)["user_id"].encode() for r in records)


def test_consumer_seeks_to_stored_offsets_on_assignment(kafka_bootstrap, kafka_config, topic_names):
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    producer = make_producer(kafka_config, kafka_bootstrap)
    try:
        for p in range(4):
            for i in range(20):
                producer.send(topic_names.behaviours, partition=p, value=b"%d:%d" % (p, i))
        producer.flush()
    finally:
        producer.close()

    stored = {TopicPartition(topic_names.behaviours, 0): 5, TopicPartition(topic_names.behaviours, 1): 20,
              TopicPartition(topic_names.behaviours, 2): 0}  # partition 3 unknown: from the beginning
    assigned, revoked = [], []

    def on_assign(partitions):
        assigned.append(list(partitions))
        return {tp: stored[tp] for tp in partitions if tp in stored}

    consumer = make_consumer(
        kafka_config, kafka_bootstrap, [topic_names.behaviours], group_id=f"g-{topic_names.behaviours}",
        on_assign=on_assign, on_revoke=revoked.append,
    )
    got: dict[int, list[int]] = defaultdict(list)
    deadline = time.monotonic() + 30
    try:
        while sum(map(len, got.values())) < 15 + 0 + 20 + 20 and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                got[tp.partition].extend(r.offset for r in records)
        assert got[0] == list(range(5, 20)) and got[1] == []
        assert got[2] == list(range(20)) and got[3] == list(range(20))
        consumer.poll(timeout_ms=200)
        assert all(v == 0 for v in lag(consumer).values())
        assert len(lag(consumer)) == 4
    finally:
        consumer.close()
    assert [sorted(tp.partition for tp in a) for a in assigned] == [[0, 1, 2, 3]]
    assert revoked and sorted(tp.partition for tp in revoked[-1]) == [0, 1, 2, 3]


def test_lag_from_high_watermark(kafka_bootstrap, kafka_config, topic_names):
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    producer = make_producer(kafka_config, kafka_bootstrap)
    try:
        for i in range(30):
            producer.send(topic_names.behaviours, partition=1, value=b"%d" % i)
        producer.flush()
    finally:
        producer.close()
    consumer = make_consumer(kafka_config, kafka_bootstrap, max_poll_records=10)
    try:
        partitions = topic_partitions(consumer, topic_names.behaviours, 10)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        assert set(lag(consumer).values()) == {None}  # no fetch answered yet
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 10 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                got.extend(records)
        behind = lag(consumer)
        assert behind[TopicPartition(topic_names.behaviours, 1)] == 30 - len(got)
    finally:
        consumer.close()


def test_concurrent_producers_keep_per_user_order(kafka_bootstrap, kafka_config, topic_names):
    """Two producer threads, disjoint users: each user's events arrive in send order."""
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)

    def produce(prefix: str) -> None:
        producer = make_producer(kafka_config, kafka_bootstrap)
        try:
            for i in range(500):
                user = f"{prefix}{i % 10}"
                producer.send(topic_names.behaviours, key=user.encode(),
                              value=encode({"user_id": user, "item_id": str(i), "behavior": "pv",
                                            "timestamp": 1.7e9 + i}))
        finally:
            producer.close()

    threads = [threading.Thread(target=produce, args=(p,)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table, dead = decode_behaviours(
        read_topic(kafka_config, kafka_bootstrap, topic_names.behaviours, expected=1000), VALIDATOR
    )
    assert dead == [] and table.num_rows == 1000
    order: dict[str, list[int]] = defaultdict(list)
    for row in sorted(table.to_pylist(), key=lambda r: (r["partition"], r["offset"])):
        order[row["user_id"]].append(int(row["item_id"]))
    assert len(order) == 20 and all(items == sorted(items) for items in order.values())


def test_failing_on_assign_holds_the_partitions(kafka_bootstrap, kafka_config, topic_names):
    ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    producer = make_producer(kafka_config, kafka_bootstrap)
    try:
        producer.send(topic_names.behaviours, partition=0, value=b"x")
        producer.flush()
    finally:
        producer.close()

    def on_assign(partitions):
        raise RuntimeError("state store unavailable")

    consumer = make_consumer(kafka_config, kafka_bootstrap, [topic_names.behaviours],
                             group_id=f"g-{topic_names.behaviours}", on_assign=on_assign)
    try:
        deadline = time.monotonic() + 30
        with pytest.raises(KafkaError):
            while time.monotonic() < deadline:
                assert consumer.poll(timeout_ms=200) == {}
        assert len(consumer.paused()) == 4
        assert consumer.poll(timeout_ms=500) == {}  # still nothing read from a wrong offset
    finally:
        consumer.close()
