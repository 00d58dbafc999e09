"""The embedded Tansu broker: loopback only, answers metadata, stops cleanly, fails clearly."""

from __future__ import annotations

import socket
import subprocess

import psutil
import pytest

from stream.broker import (
    BrokerError,
    EmbeddedBroker,
    _stop_process,
    free_port,
    is_loopback,
    kafka_cluster,
)
from stream.clients import make_admin
from stream.config import BrokerConfig, KafkaConfig


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                                  ("0.0.0.0", False), ("10.1.2.3", False), ("example.org", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_default_config_is_loopback_and_free_port():
    cfg = BrokerConfig()
    assert cfg.host == "127.0.0.1" and cfg.port == 0


@pytest.mark.integration
def test_starts_on_loopback_answers_and_stops(caplog):
    with caplog.at_level("WARNING"), EmbeddedBroker() as broker:
        host, port = broker.bootstrap.rsplit(":", 1)
        assert host == "127.0.0.1"
        process = psutil.Process(broker.process.pid)
        listening = {c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", int(port))}
        admin = make_admin(KafkaConfig(), broker.bootstrap)
        try:
            assert isinstance(admin.list_topics(), list)
        finally:
            admin.close()
        popen = broker.process
    assert "in memory only" in caplog.text
    assert popen.poll() is not None and not broker.running
    with pytest.raises(BrokerError):
        _ = broker.bootstrap
    broker.stop()  # idempotent


@pytest.mark.integration
def test_configured_port():
    port = free_port("127.0.0.1")
    with EmbeddedBroker(BrokerConfig(port=port)) as broker:
        assert broker.bootstrap == f"127.0.0.1:{port}"


@pytest.mark.integration
def test_taken_port_fails_clearly():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(BrokerError):
            EmbeddedBroker(BrokerConfig(port=port, startup_timeout_s=3)).start()


def test_bad_binary_fails_clearly(tmp_path):
    with pytest.raises(BrokerError, match="not an executable"):
        EmbeddedBroker(BrokerConfig(binary=tmp_path / "nope")).start()


@pytest.mark.integration
def test_binary_that_exits_fails_clearly(tmp_path):
    script = tmp_path / "fake-tansu"
    script.write_text("#!/bin/sh\necho 'cannot start: testing' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(BrokerError, match="exited with code 3") as info:
        EmbeddedBroker(BrokerConfig(binary=script, start_attempts=2)).start()
    assert "cannot start: testing" in str(info.value)


@pytest.mark.integration
def test_stubborn_process_is_killed(tmp_path):
    script = tmp_path / "stubborn"
    script.write_text("#!/bin/sh\ntrap '' TERM\nsleep 30\n")
    script.chmod(0o755)
    process = subprocess.Popen([str(script)])
    _stop_process(process, 0.2)
    assert process.poll() is not None


def test_kafka_cluster_uses_configured_servers():
    with kafka_cluster(KafkaConfig(bootstrap_servers="kafka-1:9092,kafka-2:9092")) as bootstrap:
        assert bootstrap == "kafka-1:9092,kafka-2:9092"


@pytest.mark.integration
def test_kafka_cluster_starts_embedded_when_unconfigured():
    with kafka_cluster(KafkaConfig()) as bootstrap:
        assert bootstrap.startswith("127.0.0.1:")
        admin = make_admin(KafkaConfig(), bootstrap)
        admin.close()
