"""Issue 13 on the embedded broker: nothing is lost silently when the broker restarts with empty
topics, a send fails, a dead letter is too large, or an event id comes back with new content."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from consumers.serve.service import Service
from stream.broker import EmbeddedBroker, free_port
from stream.clients import make_producer, read_topic
from stream.config import BrokerConfig
from stream.models import DeadLetter
from stream.topics import ensure_topics

from .test_service import produce, service_settings

pytestmark = pytest.mark.integration

START = 1.7e9


def events_for(users: range, per_user: int, prefix: str = "u", at: float = START) -> list[dict]:
    return [{"user_id": f"{prefix}{u}", "item_id": f"i{(u * 7 + k) % 13}", "behavior": "pv" if k % 3 else "cart",
             "timestamp": at + 10 * u + k, "event_id": f"{prefix}{u}-{k}-{at:.0f}"}
            for k in range(per_user) for u in users]


def steps_until(service: Service, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        service.step()


def fault_settings(tmp_path: Path, kafka_config, topic_names, **kafka):
    settings = service_settings(tmp_path, kafka_config, topic_names)
    for name, value in {"delivery_stall_s": 2.0, "delivery_backoff_ms": 50, "request_timeout_ms": 3_000,
                        "max_block_ms": 1_000, "dead_letter_ack_timeout_s": 5.0, **kafka}.items():
        setattr(settings.kafka, name, value)
    settings.drift.enabled = False
    return settings


def served_users(settings, bootstrap: str) -> set[str]:
    return {r.key.decode() for r in read_topic(settings.kafka, bootstrap, settings.topics.recommendations)}


@pytest.mark.parametrize("policy", ["fail", "reset-earliest"])
def test_broker_restarted_with_empty_topics(policy: str, kafka_config, topic_names, tmp_path: Path) -> None:
    settings = fault_settings(tmp_path, kafka_config, topic_names, offset_out_of_range=policy)
    port = free_port("127.0.0.1")
    first = events_for(range(40), 2)  # every partition gets some
    broker = EmbeddedBroker(BrokerConfig(port=port))
    broker.start()
    service = None
    try:
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        produce(broker.bootstrap, settings, first)
        service = Service(settings, broker.bootstrap)
        steps_until(service, lambda: service.report.events_applied == len(first) and service.publisher.pending == 0,
                    60, "first events applied")
        stored = service.store.offsets(settings.topics.behaviours)
        assert sum(stored.values()) == len(first)
        bootstrap = broker.bootstrap
        broker.stop()
        broker = EmbeddedBroker(BrokerConfig(port=port))
        broker.start()
        ensure_topics(bootstrap, settings.kafka, settings.topics)  # the same names, empty
        behind = {p for p, o in stored.items() if o > 0}
        assert len(behind) == settings.topics.partitions
        if policy == "fail":
            steps_until(service, lambda: {tp.partition for tp in service.offset_guard.stopped} == behind, 60,
                        "every partition with a stored offset reported")
            ok, details = service.health()
            assert not ok and any("offset out of range" in p for p in details["problems"])
            assert service.metrics.offset_out_of_range.labels(settings.topics.behaviours, str(min(behind)))._value.get() == 1
            produce(bootstrap, settings, events_for(range(12), 2, prefix="n"))
            until = time.monotonic() + 3
            while time.monotonic() < until:
                service.step()
            assert service.report.events_applied == len(first)  # nothing applied from the new log
            assert service.store.offsets(settings.topics.behaviours) == stored  # nothing it had is lost
            assert service.store.stats()["events_applied"] == len(first)
        else:
            steps_until(service, lambda: {r.partition for r in service.offset_guard.resets} == behind, 60,
                        "every partition with a stored offset reset")
            assert {r["partition"] for r in service.store.offset_resets()} == behind
            second = events_for(range(6, 18), 3, prefix="u", at=START + 1e5)  # old and new users
            produce(bootstrap, settings, second)
            steps_until(service, lambda: service.report.events_applied == len(first) + len(second)
                        and service.publisher.pending == 0 and service.producer.backlog == 0, 60,
                        "new events applied and published")
            assert service.report.duplicates == 0
            assert service.store.stats()["events_applied"] == len(first) + len(second)  # each exactly once
            assert served_users(settings, bootstrap) >= {e["user_id"] for e in second}
            assert service.health()[0], service.health()
    finally:
        if service is not None:
            service.stop()
            service._shutdown()
        broker.stop()


def test_broker_stopped_while_publishing(kafka_config, topic_names, tmp_path: Path) -> None:
    settings = fault_settings(tmp_path, kafka_config, topic_names, offset_out_of_range="reset-earliest",
                              delivery_retries=1)
    settings.serve.refresh_max_delay_ms = 600_000  # lists wait until the test publishes them
    port = free_port("127.0.0.1")
    events = events_for(range(20), 2)
    users = sorted({e["user_id"] for e in events})
    broker = EmbeddedBroker(BrokerConfig(port=port))
    broker.start()
    service = None
    try:
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        produce(broker.bootstrap, settings, events)
        service = Service(settings, broker.bootstrap)
        steps_until(service, lambda: service.report.events_applied == len(events), 60, "events applied")
        assert service.publisher.pending == len(users)
        bootstrap = broker.bootstrap
        broker.stop()
        service.publisher.work(force=True)  # every list is sent to a stopped broker
        deadline = time.monotonic() + 30
        while service.producer.backlog and time.monotonic() < deadline:
            time.sleep(0.1)
        service.publisher.record_published()
        assert service.store.registry.last_published(users) == {}  # nothing marked published without an ack
        assert service.publisher.recommendations == 0
        assert not service.health()[0]
        service.cfg.refresh_max_delay_ms = 0  # from now on lists go out as soon as they can
        broker = EmbeddedBroker(BrokerConfig(port=port))
        broker.start()
        ensure_topics(bootstrap, settings.kafka, settings.topics)
        steps_until(service, lambda: service.publisher.pending == 0 and service.producer.backlog == 0
                    and service.publisher.recommendations >= len(users), 90, "every user served after the return")
        service.publisher.record_published()
        assert set(service.store.registry.last_published(users)) == set(users)
        assert served_users(settings, bootstrap) == set(users)
    finally:
        if service is not None:
            service.stop()
            service._shutdown()
        broker.stop()


def test_a_700_kB_key_dead_letter_is_cut_to_fit(kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path) -> None:
    settings = fault_settings(tmp_path, kafka_config, topic_names)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    key = bytes(range(256)) * (700_000 // 256)
    producer = make_producer(settings.kafka, kafka_bootstrap)
    producer.send(settings.topics.behaviours, key=key, value=b"{not json")
    for event in events_for(range(3), 1):
        producer.send(settings.topics.behaviours, key=event["user_id"].encode(), value=json.dumps(event).encode())
    producer.flush()
    producer.close()
    service = Service(settings, kafka_bootstrap)
    try:
        steps_until(service, lambda: service.report.events_applied == 3 and service.report.dead_letters == 1, 60,
                    "events applied and the dead letter delivered")
        letters = [DeadLetter.model_validate_json(r.value)
                   for r in read_topic(settings.kafka, kafka_bootstrap, settings.topics.dead_letters)]
        assert len(letters) == service.report.dead_letters == service.dead_letters.total == 1
        letter = letters[0]
        assert letter.kind == "invalid_json" and letter.reason
        assert letter.key_truncated and letter.key == key[:len(letter.key)]
        assert letter.key_size == len(key) and letter.key_sha256 == hashlib.sha256(key).hexdigest()
        assert letter.original == b"{not json" and letter.original_sha256 == hashlib.sha256(b"{not json").hexdigest()
    finally:
        service.stop()
        service._shutdown()


def test_a_conflicting_duplicate_goes_to_the_dead_letter_topic(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = fault_settings(tmp_path, kafka_config, topic_names)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    original = {"user_id": "u", "item_id": "a", "behavior": "pv", "timestamp": START, "event_id": "e1"}
    produce(kafka_bootstrap, settings, [original])
    service = Service(settings, kafka_bootstrap)
    try:
        steps_until(service, lambda: service.report.events_applied == 1, 60, "first event applied")
        produce(kafka_bootstrap, settings, [
            {**original, "item_id": "b"},  # same id, other content
            dict(original),  # an exact retry
        ])
        steps_until(service, lambda: service.report.dead_letters == 1 and service.report.duplicates == 1, 60,
                    "conflict dead-lettered, exact duplicate dropped")
        letters = [DeadLetter.model_validate_json(r.value)
                   for r in read_topic(settings.kafka, kafka_bootstrap, settings.topics.dead_letters)]
        assert [letter.kind for letter in letters] == ["conflicting_duplicate"]
        assert letters[0].reason.count("sha256") == 2 and "'e1'" in letters[0].reason
        assert service.store.stats()["events_applied"] == 1
        assert service.store.sequences(["u"], width=3).items[0, -1] == 1  # item "a" stays
    finally:
        service.stop()
        service._shutdown()


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "apply-thread"])
def test_an_undeliverable_dead_letter_holds_its_batch_back(
    threaded: bool, kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = fault_settings(tmp_path, kafka_config, topic_names, max_request_size=2048)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    producer = make_producer(settings.kafka, kafka_bootstrap)
    producer.send(settings.topics.behaviours, key=b"u0", value=b"{not json" + b"x" * 8_000)
    producer.flush()
    producer.close()
    produce(kafka_bootstrap, settings, events_for(range(3), 1))
    service = Service(settings, kafka_bootstrap)
    service.dead_letters.max_record_bytes = 10**6  # not cut to the producer's limit: it cannot be sent
    if threaded:  # as `run` does: later polls queue up while the held-back batch waits
        service.stage.start()
    try:
        steps_until(service, lambda: service.metrics.dead_letter_holds._value.get() >= 2, 60, "batch held back twice")
        assert service.report.events_applied == 0 and service.report.dead_letters == 0
        assert service.store.offsets(settings.topics.behaviours) == {}  # no offset recorded past it
        ok, details = service.health()
        assert not ok and any("held back" in p for p in details["problems"])
        service.dead_letters.max_record_bytes = settings.kafka.max_request_size  # cut to fit again
        steps_until(service, lambda: service.report.events_applied == 3 and service.report.dead_letters == 1, 60,
                    "batch applied once the dead letter landed")
        assert not any("held back" in p for p in service.health()[1]["problems"])
        letters = read_topic(settings.kafka, kafka_bootstrap, settings.topics.dead_letters)
        assert len(letters) == 1 and DeadLetter.model_validate_json(letters[0].value).truncated
    finally:
        service.stop()
        service._shutdown()
