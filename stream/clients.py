"""kafka-python clients configured from `KafkaConfig`: a throughput-tuned producer keyed by user, a
consumer with manual offsets that seeks to the offsets our state store holds when partitions are
assigned, an admin client, lag from the fetch high watermark, and the security options.

Embedded-broker facts (Tansu) shape these helpers: its end offsets are wrong, so nothing here uses
``end_offsets``/``seek_to_end``/``latest``; lag is ``highwater - position`` (the high watermark
comes with fetch responses, so it is known only after a poll).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    OffsetAndMetadata,
    TopicPartition,
)
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from kafka.partitioner.abc import Partitioner
from kafka.partitioner.default import DefaultPartitioner, murmur2

from stream.config import KafkaConfig

log = logging.getLogger(__name__)

KEY_ENCODING = "utf-8"
KAFKA_RESOURCE_WARNING = r"(open_text|read_text|open_binary|read_binary|path) is deprecated"

OnAssign = Callable[[list[TopicPartition]], Mapping[TopicPartition, int] | None]
"""Called with newly assigned partitions; returns the next offset to read of those it knows."""
OnRevoke = Callable[[list[TopicPartition]], None]
"""Called with partitions about to be taken away (flush what belongs to them)."""


def crc32c_native() -> bool:
    """Whether kafka-python computes CRC32C with the native ``crc32c`` package (2-5x faster consume)."""
    from kafka.record import util

    return getattr(util, "crc32c_c", None) is not None and util._crc32c is util.crc32c_c


_warned_crc = False


def _check_crc32c() -> None:
    global _warned_crc
    if not _warned_crc and not crc32c_native():
        _warned_crc = True
        log.warning("the crc32c package is missing: kafka-python checks CRCs in pure Python and "
                    "consumes 2-5x slower (pip install crc32c)")


def quiet_kafka_warnings() -> None:
    """Hide kafka-python 3.x's DeprecationWarnings about its own API (not actionable by us or users).
    They are filtered, never turned into errors."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"kafka(\.|$)")
    # kafka-python loads its protocol schemas with importlib.resources' legacy functions.
    warnings.filterwarnings("ignore", KAFKA_RESOURCE_WARNING, DeprecationWarning, r"importlib\.resources")


def user_key(user_id: str) -> bytes:
    """The message key of a user's events and recommendations."""
    return user_id.encode(KEY_ENCODING)


def bootstrap_list(bootstrap: str | Sequence[str]) -> list[str]:
    """``"h1:9092,h2:9092"`` -> ``["h1:9092", "h2:9092"]``; raises on an empty list."""
    servers = [s.strip() for s in bootstrap.split(",")] if isinstance(bootstrap, str) else list(bootstrap)
    servers = [s for s in servers if s]
    if not servers:
        raise ValueError("no Kafka bootstrap servers given")
    return servers


def security_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """kafka-python options for `cfg.security_protocol` (SASL and SSL). Raises ValueError when a
    needed setting is missing and FileNotFoundError when a configured SSL file is absent."""
    protocol = cfg.security_protocol
    kwargs: dict[str, Any] = {"security_protocol": protocol}
    if protocol.startswith("SASL_"):
        missing = [
            name
            for name, value in (
                ("kafka.sasl_mechanism", cfg.sasl_mechanism),
                ("kafka.sasl_username", cfg.sasl_username),
                ("kafka.sasl_password", cfg.sasl_password),
            )
            if value is None
        ]
        if missing:
            raise ValueError(f"security_protocol {protocol} needs {', '.join(missing)}")
        assert cfg.sasl_password is not None
        kwargs.update(
            sasl_mechanism=cfg.sasl_mechanism,
            sasl_plain_username=cfg.sasl_username,
            sasl_plain_password=cfg.sasl_password.get_secret_value(),
        )
    elif cfg.sasl_mechanism or cfg.sasl_username or cfg.sasl_password:
        log.warning("SASL settings are ignored: security_protocol is %s", protocol)
    if protocol.endswith("SSL"):
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(cfg, name)
            if path is not None:
                if not path.is_file():
                    raise FileNotFoundError(f"kafka.{name}: {path} does not exist")
                kwargs[name] = str(path)
        if (cfg.ssl_certfile is None) != (cfg.ssl_keyfile is None):
            raise ValueError("kafka.ssl_certfile and kafka.ssl_keyfile go together (mutual TLS)")
        if cfg.ssl_password is not None:
            kwargs["ssl_password"] = cfg.ssl_password.get_secret_value()
        kwargs["ssl_check_hostname"] = cfg.ssl_check_hostname
    elif cfg.ssl_cafile or cfg.ssl_certfile or cfg.ssl_keyfile:
        log.warning("SSL files are ignored: security_protocol is %s", protocol)
    return kwargs


def common_kwargs(cfg: KafkaConfig, bootstrap: str | Sequence[str] | None = None) -> dict[str, Any]:
    """Options every client shares: servers (`bootstrap`, default ``cfg.bootstrap_servers``), client
    id, timeouts, security."""
    return {
        "bootstrap_servers": bootstrap_list(cfg.bootstrap_servers if bootstrap is None else bootstrap),
        "client_id": cfg.client_id,
        "request_timeout_ms": cfg.request_timeout_ms,
        **security_kwargs(cfg),
    }


class CachedKeyPartitioner(Partitioner):
    """kafka-python's default partitioner (murmur2 of the key, as Java's: other producers put a user
    on the same partition) with a bounded cache of key -> partition, because kafka-python's murmur2
    is pure Python and users repeat. Records without a key go to a random available partition."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._cache: dict[tuple[str, int, bytes], int] = {}
        self._fallback = DefaultPartitioner()

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):  # type: ignore[override]
        if serialized_key is None:
            return self._fallback.partition(topic, key, serialized_key, value, serialized_value, cluster)
        partitions = cluster.partitions_for_topic(topic)
        if partitions is None:
            raise ValueError(f"topic {topic} not found in the cluster metadata")
        cache_key = (topic, len(partitions), serialized_key)
        found = self._cache.get(cache_key)
        if found is not None:
            return found
        ordered = sorted(partitions)
        chosen = ordered[(murmur2(serialized_key) & 0x7FFFFFFF) % len(ordered)]
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[cache_key] = chosen
        return chosen


def producer_kwargs(cfg: KafkaConfig, bootstrap: str | Sequence[str] | None = None) -> dict[str, Any]:
    """KafkaProducer options: throughput (linger, large batches), acks from the settings (``all``
    keeps the idempotent producer on), and the caching murmur2 partitioner for keyed records."""
    kwargs = common_kwargs(cfg, bootstrap)
    kwargs.update(
        acks=cfg.acks if cfg.acks == "all" else int(cfg.acks),
        linger_ms=cfg.linger_ms,
        batch_size=cfg.producer_batch_size,
    )
    if cfg.acks != "all":
        kwargs["enable_idempotence"] = False  # idempotence requires acks=all
    if cfg.compression_type != "none":
        kwargs["compression_type"] = cfg.compression_type
    if cfg.partition_cache_size > 0:
        kwargs["partitioner"] = CachedKeyPartitioner(cfg.partition_cache_size)
    return kwargs


def make_producer(cfg: KafkaConfig, bootstrap: str | Sequence[str], **overrides: Any) -> KafkaProducer:
    """A KafkaProducer for `bootstrap` with `producer_kwargs` (plus `overrides`). Send bytes: key
    `user_key(user_id)`, value the JSON message."""
    quiet_kafka_warnings()
    return KafkaProducer(**{**producer_kwargs(cfg, bootstrap), **overrides})


def consumer_kwargs(
    cfg: KafkaConfig, bootstrap: str | Sequence[str] | None = None, group_id: str | None = None
) -> dict[str, Any]:
    """KafkaConsumer options for the service: manual offsets (no auto commit), ``earliest`` where no
    offset is known, large fetches, the group timeouts of the settings."""
    kwargs = common_kwargs(cfg, bootstrap)
    kwargs.update(
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_records=cfg.max_poll_records,
        fetch_max_bytes=cfg.fetch_max_bytes,
        max_partition_fetch_bytes=cfg.max_partition_fetch_bytes,
        fetch_max_wait_ms=cfg.fetch_max_wait_ms,
        allow_auto_create_topics=False,
    )
    return kwargs


class SeekOnAssign(ConsumerRebalanceListener):
    """On assignment, seeks each partition to the offset `on_assign` returns for it (the state
    store's "next offset to read"); partitions it has no offset for are read from the beginning,
    because the store, not Kafka's committed offsets, is the source of truth. If `on_assign` raises,
    the new partitions are paused (nothing is read from a wrong offset) and ``poll`` raises a
    KafkaError. On revocation calls `on_revoke` so the owner can flush what belongs to those
    partitions. Callbacks run inside ``poll`` and should return well within the session timeout."""

    def __init__(self, consumer: KafkaConsumer, on_assign: OnAssign | None, on_revoke: OnRevoke | None) -> None:
        self.consumer = consumer
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.assignments = 0

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        revoked = sorted(revoked)
        if revoked and self.on_revoke is not None:
            self.on_revoke(revoked)

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        assigned = sorted(assigned)
        self.assignments += 1
        try:
            stored = dict(self.on_assign(assigned) or {}) if self.on_assign is not None else {}
        except Exception:
            # Never read from a wrong offset: hold the partitions; kafka-python re-raises the error
            # from poll() as a KafkaError.
            self.consumer.pause(*assigned)
            raise
        fresh = []
        for tp in assigned:
            offset = stored.get(tp)
            if offset is None:
                fresh.append(tp)
            else:
                self.consumer.seek(tp, int(offset))
        if fresh:
            self.consumer.seek_to_beginning(*fresh)
        log.info(
            "assigned %d partitions: %d sought to stored offsets, %d from the beginning",
            len(assigned), len(assigned) - len(fresh), len(fresh),
        )


def make_consumer(
    cfg: KafkaConfig,
    bootstrap: str | Sequence[str],
    topics: Sequence[str] = (),
    group_id: str | None = None,
    on_assign: OnAssign | None = None,
    on_revoke: OnRevoke | None = None,
    **overrides: Any,
) -> KafkaConsumer:
    """A KafkaConsumer with manual offsets. With `topics` it subscribes as member of `group_id`
    (default ``cfg.group_id``) and seeks on every assignment (`SeekOnAssign`); without, the caller
    assigns partitions itself (``group_id`` None means no group at all)."""
    quiet_kafka_warnings()
    _check_crc32c()
    if topics and group_id is None:
        group_id = cfg.group_id
    consumer = KafkaConsumer(**{**consumer_kwargs(cfg, bootstrap, group_id), **overrides})
    if topics:
        consumer.subscribe(list(topics), listener=SeekOnAssign(consumer, on_assign, on_revoke))
    return consumer


def make_admin(cfg: KafkaConfig, bootstrap: str | Sequence[str], **overrides: Any) -> KafkaAdminClient:
    """A KafkaAdminClient for `bootstrap`."""
    quiet_kafka_warnings()
    return KafkaAdminClient(**{**common_kwargs(cfg, bootstrap), **overrides})


def lag(consumer: KafkaConsumer) -> dict[TopicPartition, int | None]:
    """Records behind per assigned partition: ``highwater - position`` (never ``end_offsets``).
    None where no fetch has answered yet for the partition (poll first)."""
    result: dict[TopicPartition, int | None] = {}
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        position = None
        if high is not None:
            try:
                position = consumer.position(tp, timeout_ms=0)
            except KafkaError:  # position not known yet (a reset in flight)
                position = None
        result[tp] = None if high is None or position is None else max(0, high - position)
    return result


def caught_up(consumer: KafkaConsumer) -> bool:
    """Whether every assigned partition has been fetched and read up to its high watermark."""
    return all(behind == 0 for behind in lag(consumer).values())


def commit_offsets(consumer: KafkaConsumer, offsets: Mapping[TopicPartition, int]) -> None:
    """Commit "next offset to read" per partition to the group (for tools that show group lag; our
    own restarts read the state store's offsets)."""
    consumer.commit({tp: OffsetAndMetadata(int(o), "", -1) for tp, o in offsets.items()})


def topic_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float) -> list[TopicPartition]:
    """The partitions of `topic` (waits up to `timeout_s` for metadata to show it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return [TopicPartition(topic, p) for p in sorted(partitions)]
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic!r} has no partitions in the cluster metadata")
        time.sleep(0.05)


def _seek_to_tail(consumer: KafkaConsumer, partitions: list[TopicPartition], tail: int, deadline: float) -> None:
    """Seek each partition to its last `tail` records (high watermarks as the first fetches tell
    them: the broker's end offsets are not to be trusted)."""
    while any(consumer.highwater(tp) is None for tp in partitions) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=50, max_records=1)
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is not None:
            consumer.seek(tp, max(0, high - tail))


def read_topic(
    cfg: KafkaConfig,
    bootstrap: str | Sequence[str],
    topic: str,
    timeout_s: float = 30.0,
    expected: int | None = None,
    tail: int | None = None,
) -> list[ConsumerRecord]:
    """Every record of `topic` now, in offset order per partition (partitions one after another),
    read without a group from the beginning (or only each partition's last `tail` records) until
    each partition's position reaches its high watermark (or `expected` records arrived). For
    tests, checks and tools, not the service."""
    consumer = make_consumer(cfg, bootstrap, group_id=None)
    try:
        partitions = topic_partitions(consumer, topic, timeout_s)
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        if tail is not None:
            _seek_to_tail(consumer, partitions, tail, deadline)
        by_partition: dict[TopicPartition, list[ConsumerRecord]] = {tp: [] for tp in partitions}
        while True:
            polled = consumer.poll(timeout_ms=200)
            for tp, records in polled.items():
                by_partition[tp].extend(records)
            count = sum(len(r) for r in by_partition.values())
            if expected is not None:
                if count >= expected:
                    break
            elif not polled and caught_up(consumer):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read {count} records of {topic!r} in {timeout_s} s without reaching the end"
                )
        return [r for tp in partitions for r in by_partition[tp]]
    finally:
        consumer.close()
