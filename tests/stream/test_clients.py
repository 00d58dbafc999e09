"""Client options built from the settings (no broker needed)."""

from __future__ import annotations

import logging

import pytest
from kafka.partitioner.default import DefaultPartitioner

from stream.clients import (
    CachedKeyPartitioner,
    bootstrap_list,
    consumer_kwargs,
    producer_kwargs,
    security_kwargs,
    user_key,
)
from stream.config import KafkaConfig


def test_bootstrap_list():
    assert bootstrap_list(" a:1, b:2 ,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        bootstrap_list(" , ")


def test_plaintext_has_no_secrets():
    assert security_kwargs(KafkaConfig()) == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_kwargs(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = KafkaConfig(
        bootstrap_servers="broker:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
        sasl_username="casm", sasl_password="s3cret", ssl_cafile=ca,
    )
    kwargs = security_kwargs(cfg)
    assert kwargs == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "casm",
        "sasl_plain_password": "s3cret",
        "ssl_cafile": str(ca),
        "ssl_check_hostname": True,
    }
    assert "s3cret" not in repr(cfg)


def test_sasl_plaintext_needs_credentials():
    with pytest.raises(ValueError, match="sasl_username"):
        security_kwargs(KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN",
                                    sasl_password="p"))


def test_mutual_tls_files(tmp_path):
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("x")
    cfg = KafkaConfig(security_protocol="SSL", ssl_cafile=files["ca"], ssl_certfile=files["cert"],
                      ssl_keyfile=files["key"], ssl_password="kp", ssl_check_hostname=False)
    kwargs = security_kwargs(cfg)
    assert kwargs["ssl_certfile"] == str(files["cert"]) and kwargs["ssl_keyfile"] == str(files["key"])
    assert kwargs["ssl_password"] == "kp" and kwargs["ssl_check_hostname"] is False
    assert "sasl_mechanism" not in kwargs
    with pytest.raises(ValueError, match="go together"):
        security_kwargs(KafkaConfig(security_protocol="SSL", ssl_certfile=files["cert"]))
    with pytest.raises(FileNotFoundError):
        security_kwargs(KafkaConfig(security_protocol="SSL", ssl_cafile=tmp_path / "missing.pem"))


def test_ignored_security_settings_warn(caplog):
    with caplog.at_level(logging.WARNING):
        security_kwargs(KafkaConfig(sasl_username="u"))
    assert "ignored" in caplog.text


def test_producer_kwargs_are_tuned_for_throughput():
    cfg = KafkaConfig(linger_ms=7, producer_batch_size=512 * 1024, compression_type="gzip")
    kwargs = producer_kwargs(cfg, "h:1")
    assert kwargs["bootstrap_servers"] == ["h:1"]
    assert kwargs["acks"] == "all" and kwargs["linger_ms"] == 7 and kwargs["batch_size"] == 512 * 1024
    assert kwargs["compression_type"] == "gzip" and "enable_idempotence" not in kwargs
    assert isinstance(kwargs["partitioner"], CachedKeyPartitioner)
    weak = producer_kwargs(KafkaConfig(acks="1", partition_cache_size=0), "h:1")
    assert weak["acks"] == 1 and weak["enable_idempotence"] is False and "partitioner" not in weak


def test_consumer_kwargs_manual_offsets_from_earliest():
    cfg = KafkaConfig(session_timeout_ms=6000, heartbeat_interval_ms=500, max_poll_records=123)
    kwargs = consumer_kwargs(cfg, "h:1,h:2", "grp")
    assert kwargs["enable_auto_commit"] is False and kwargs["auto_offset_reset"] == "earliest"
    assert kwargs["group_id"] == "grp" and kwargs["bootstrap_servers"] == ["h:1", "h:2"]
    assert (kwargs["session_timeout_ms"], kwargs["heartbeat_interval_ms"]) == (6000, 500)
    assert kwargs["max_poll_records"] == 123


class FakeCluster:
    def __init__(self, partitions):
        self._partitions = set(partitions)

    def topics(self):
        return {"t"}

    def partitions_for_topic(self, topic):
        return self._partitions

    def available_partitions_for_topic(self, topic):
        return self._partitions


def test_cached_partitioner_agrees_with_kafka_default():
    ours, reference = CachedKeyPartitioner(max_entries=50), DefaultPartitioner()
    for n in (1, 4, 7):
        cluster = FakeCluster(range(n))
        for i in range(200):
            key = user_key(f"user-{i}")
            expected = reference.partition("t", None, key, None, None, cluster)
            assert ours.partition("t", None, key, None, None, cluster) == expected
            assert ours.partition("t", None, key, None, None, cluster) == expected  # cached
    assert len(ours._cache) <= 50
    assert ours.partition("t", None, None, None, None, FakeCluster(range(3))) in range(3)


def test_user_key_is_utf8():
    assert user_key("ü") == "ü".encode()


def test_native_crc32c_is_installed():
    from stream.clients import crc32c_native

    assert crc32c_native(), "pip install crc32c: kafka-python consumes 2-5x slower without it"


def test_bootstrap_defaults_to_the_settings():
    assert producer_kwargs(KafkaConfig(bootstrap_servers="k:9"))["bootstrap_servers"] == ["k:9"]
    with pytest.raises(ValueError):
        consumer_kwargs(KafkaConfig())
