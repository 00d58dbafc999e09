"""`AcknowledgedProducer`: a record counts only once the broker acknowledged it; a producer left
stuck by a broker restart (kafka-python's idempotent producer retries its lost producer id
forever) is rebuilt and the records get through to the new broker."""

from __future__ import annotations

import pytest

from stream.broker import EmbeddedBroker, free_port
from stream.clients import make_producer, read_topic
from stream.config import BrokerConfig
from stream.delivery import acknowledged_producer, wait_all
from stream.testing import kafka_test_config, unique_topics
from stream.topics import ensure_topics

pytestmark = pytest.mark.integration


def test_a_broker_restart_with_empty_topics_is_survived_and_counted_only_on_ack() -> None:
    cfg = kafka_test_config(delivery_stall_s=2.0, delivery_backoff_ms=50, request_timeout_ms=3_000)
    topics = unique_topics("delivery", partitions=2)
    port = free_port("127.0.0.1")
    acked: list[int] = []
    with EmbeddedBroker(BrokerConfig(port=port)) as broker:
        ensure_topics(broker.bootstrap, cfg, topics)
        producer = acknowledged_producer(cfg, broker.bootstrap, make_producer)
        first = [producer.send(topics.recommendations, key=b"u%d" % i, value=b"%d" % i,
                               on_ack=lambda _m, i=i: acked.append(i)) for i in range(5)]
        assert wait_all(first, 10)
    assert sorted(acked) == list(range(5))
    with EmbeddedBroker(BrokerConfig(port=port)) as broker:
        ensure_topics(broker.bootstrap, cfg, topics)
        second = [producer.send(topics.recommendations, key=b"u%d" % i, value=b"%d" % i,
                                on_ack=lambda _m, i=i: acked.append(i)) for i in range(5, 10)]
        assert wait_all(second, 30), producer.stats()
        assert sorted(acked) == list(range(10))
        stats = producer.stats()
        assert stats["acknowledged"][topics.recommendations] == 10
        assert producer.health()[0]
        producer.close(5)
        values = sorted(int(r.value) for r in read_topic(cfg, broker.bootstrap, topics.recommendations))
        assert values == list(range(5, 10))  # the new broker holds exactly the second lot


def test_a_send_to_a_stopped_broker_is_never_acknowledged_and_health_says_why() -> None:
    cfg = kafka_test_config(delivery_stall_s=1.0, delivery_backoff_ms=50, delivery_retries=1,
                            request_timeout_ms=2_000, max_block_ms=500)
    topics = unique_topics("delivery", partitions=1)
    with EmbeddedBroker(BrokerConfig()) as broker:
        ensure_topics(broker.bootstrap, cfg, topics)
        producer = acknowledged_producer(cfg, broker.bootstrap, make_producer)
        assert producer.send(topics.recommendations, value=b"x").wait(10)
    failed: list[BaseException] = []
    outcome = producer.send(topics.recommendations, value=b"y", on_ack=lambda m: pytest.fail("acked"),
                            on_fail=failed.append)
    assert not outcome.wait(30)
    assert failed and outcome.done
    ok, reason = producer.health()
    assert not ok and "cannot be delivered" in reason
    producer.close(0.5)
