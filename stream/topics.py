"""Topic admin: create our topics with their final partition counts, idempotently.

Partition counts are final because keys (users) map to partitions by hash: adding partitions later
would move users and break per-user order (and the embedded broker cannot add partitions anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from stream.clients import make_admin
from stream.config import KafkaConfig, TopicsConfig

log = logging.getLogger(__name__)

_POLL_S = 0.05


def topic_names(topics_cfg: TopicsConfig) -> list[str]:
    """Our topics: behaviours, recommendations, dead letters, and event scores unless disabled."""
    names = [topics_cfg.behaviours, topics_cfg.recommendations, topics_cfg.dead_letters]
    return names + [topics_cfg.scores] if topics_cfg.scores else names


def _partition_counts(admin, names: Sequence[str]) -> dict[str, int]:
    existing = set(admin.list_topics())
    wanted = [n for n in names if n in existing]
    if not wanted:
        return {}
    counts: dict[str, int] = {}
    for described in admin.describe_topics(wanted):
        if described.get("error_code", 0) == 0:
            counts[described["name"]] = len(described.get("partitions") or [])
    return counts


def create_topics(
    bootstrap: str,
    kafka_cfg: KafkaConfig,
    names: Sequence[str],
    partitions: int,
    replication_factor: int = 1,
) -> dict[str, int]:
    """Create the topics of `names` that do not exist, with `partitions` each; returns every named
    topic's partition count. Existing topics are left as they are (a different partition count is
    logged as a warning, never changed). Waits until the cluster shows them all."""
    admin = make_admin(kafka_cfg, bootstrap)
    try:
        counts = _partition_counts(admin, names)
        missing = [n for n in names if n not in counts]
        if missing:
            try:
                admin.create_topics(
                    [NewTopic(n, partitions, replication_factor) for n in missing],
                    timeout_ms=int(kafka_cfg.admin_timeout_s * 1000),
                )
                log.info("created topics %s with %d partitions", missing, partitions)
            except TopicAlreadyExistsError:
                log.info("topics %s were created meanwhile by someone else", missing)
        deadline = time.monotonic() + kafka_cfg.admin_timeout_s
        while True:
            counts = _partition_counts(admin, names)
            if all(counts.get(n, 0) > 0 for n in names):
                break
            if time.monotonic() > deadline:
                absent = [n for n in names if not counts.get(n)]
                raise TimeoutError(f"topics {absent} did not appear within {kafka_cfg.admin_timeout_s} s")
            time.sleep(_POLL_S)
        for name in names:
            if counts[name] != partitions:
                log.warning(
                    "topic %s exists with %d partitions, not the configured %d; it is used as it is",
                    name, counts[name], partitions,
                )
        return {n: counts[n] for n in names}
    finally:
        admin.close()


def ensure_topics(bootstrap: str, kafka_cfg: KafkaConfig, topics_cfg: TopicsConfig) -> dict[str, int]:
    """Create behaviours, recommendations, the dead-letter topic and the changelog with
    ``topics_cfg.partitions``, and the one-partition models and status topics, where they do not
    exist (idempotent); returns their partition counts."""
    counts = create_topics(
        bootstrap, kafka_cfg, [*topic_names(topics_cfg), topics_cfg.changelog], topics_cfg.partitions,
        topics_cfg.replication_factor,
    )
    # One partition each: the models topic is read in order (a version's chunks, then the next
    # version), the status topic is small.
    counts.update(create_topics(bootstrap, kafka_cfg, [topics_cfg.models, topics_cfg.status], 1,
                                topics_cfg.replication_factor))
    return counts
