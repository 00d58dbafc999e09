"""Kafka for tests: one bootstrap address per test session, from (first that works)

1. ``$CASM_TEST_BOOTSTRAP`` - a cluster you run yourself;
2. a testcontainers Kafka container - when a Docker daemon answers a ping within
   ``DOCKER_PING_TIMEOUT_S`` and the image starts (``$CASM_TEST_KAFKA_IMAGE``, default
   `KAFKA_IMAGE`; a ``redpanda`` image uses the Redpanda container);
3. the embedded Tansu broker.

Plus unique topic names per test and the client settings tests use (short group timeouts: a group
join takes about half the session timeout). testcontainers and the docker SDK are dev dependencies,
imported only when needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator

from stream.broker import EmbeddedBroker
from stream.config import BrokerConfig, KafkaConfig, TopicsConfig

log = logging.getLogger(__name__)

BOOTSTRAP_ENV = "CASM_TEST_BOOTSTRAP"
IMAGE_ENV = "CASM_TEST_KAFKA_IMAGE"
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
DOCKER_PING_TIMEOUT_S = 3
CONTAINER_START_TIMEOUT_S = 120
TEST_SESSION_TIMEOUT_MS = 6_000
TEST_HEARTBEAT_INTERVAL_MS = 500
TEST_PARTITIONS = 4


def kafka_test_config(**overrides: object) -> KafkaConfig:
    """KafkaConfig for tests: group timeouts short enough that joins take ~3 s."""
    return KafkaConfig(
        **{
            "session_timeout_ms": TEST_SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": TEST_HEARTBEAT_INTERVAL_MS,
            **overrides,
        }
    )


def unique_topics(prefix: str = "t", partitions: int = TEST_PARTITIONS) -> TopicsConfig:
    """TopicsConfig whose names carry a fresh random suffix."""
    suffix = f"{prefix}-{uuid.uuid4().hex[:12]}"
    return TopicsConfig(
        behaviours=f"behaviours-{suffix}",
        recommendations=f"recommendations-{suffix}",
        dead_letters=f"behaviours.dlq-{suffix}",
        scores=f"behaviours.scores-{suffix}",
        changelog=f"behaviours.changelog-{suffix}",
        models=f"casm.models-{suffix}",
        status=f"casm.status-{suffix}",
        partitions=partitions,
    )


def docker_available(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """Whether a Docker daemon answers a ping within `timeout_s`."""
    try:
        import docker
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=int(max(1, timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means: no usable Docker
        log.info("no Docker daemon: %s", exc)
        return False


@contextlib.contextmanager
def kafka_container(image: str | None = None) -> Iterator[str]:
    """A Kafka (or Redpanda) container via testcontainers; yields its bootstrap address."""
    image = image or os.environ.get(IMAGE_ENV, KAFKA_IMAGE)
    try:
        from testcontainers.community.kafka import KafkaContainer, RedpandaContainer
    except ImportError:  # testcontainers < 4.10 kept them here
        from testcontainers.kafka import KafkaContainer, RedpandaContainer  # type: ignore[no-redef]
    if "redpanda" in image:
        container = RedpandaContainer(image)
        container.start(timeout=CONTAINER_START_TIMEOUT_S)
    else:
        container = KafkaContainer(image).with_kraft()
        container.start(timeout=CONTAINER_START_TIMEOUT_S)
    try:
        yield container.get_bootstrap_server()
    finally:
        container.stop()


@contextlib.contextmanager
def session_bootstrap(broker_cfg: BrokerConfig | None = None) -> Iterator[str]:
    """The session's Kafka: ``$CASM_TEST_BOOTSTRAP``, else a container when Docker answers and the
    image starts, else the embedded broker."""
    configured = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if configured:
        log.info("tests use the Kafka at %s (%s)", configured, BOOTSTRAP_ENV)
        yield configured
        return
    if docker_available():
        stack = contextlib.ExitStack()
        try:
            bootstrap = stack.enter_context(kafka_container())
        except Exception as exc:  # noqa: BLE001 - fall back to the embedded broker
            stack.close()
            log.warning("Kafka container did not start (%s); using the embedded broker", exc)
        else:
            with stack:
                log.info("tests use a Kafka container at %s", bootstrap)
                yield bootstrap
            return
    with EmbeddedBroker(broker_cfg) as broker:
        log.info("tests use the embedded broker at %s", broker.bootstrap)
        yield broker.bootstrap
