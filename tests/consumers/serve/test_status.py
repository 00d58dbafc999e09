"""Scale-out status (`consumers.serve.status`, `casm status`): the record's JSON, the reporter's
period and best-effort sends, the table's checks, and reading the topic back from a broker."""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import replace

import pytest

from consumers.cli.main import main
from consumers.serve.status import (
    STOPPED,
    InstanceStatus,
    StatusReporter,
    default_instance_id,
    format_status,
    instance_id,
    lag_by_key,
    partition_ranges,
    read_status,
    shared_partitions,
    shown_state,
)
from consumers.settings import CasmSettings

NOW = 1_700_000_000.0  # a wall-clock instant (unix s) for the table tests


def status(name: str, role: str = "ingest", **fields) -> InstanceStatus:
    base = dict(instance=name, role=role, host="h", pid=1, partitions=[], lag={}, model_version=3,
                model_published_at=NOW - 30.0, model_loaded_at=NOW - 20.0, events_applied=10, at=NOW - 1.0)
    return InstanceStatus(**{**base, **fields})


# ------------------------------------------------------------------------------ the record


def test_json_round_trip_ignores_unknown_keys() -> None:
    record = status("ingest-1", partitions=[0, 2], lag={"behaviours[0]": 5, "behaviours[2]": 0},
                    model_loaded_at=None)
    assert InstanceStatus.from_json(record.to_json()) == record
    raw = json.loads(record.to_json())
    raw["from_a_newer_version"] = {"x": 1}
    assert InstanceStatus.from_json(json.dumps(raw).encode()) == record
    assert record.total_lag == 5
    minimal = InstanceStatus.from_json(b'{"instance": "a", "role": "trainer", "host": "h", "pid": 7}')
    assert (minimal.state, minimal.partitions, minimal.model_version, minimal.model_published_at) == (
        "running", [], 0, None)


@pytest.mark.parametrize("value", [
    b"not json", b"[1, 2]", b'{"role": "ingest", "host": "h", "pid": 1}',
    b'{"instance": "a", "role": "ingest", "host": "h", "pid": "1"}',
    b'{"instance": "a", "role": "ingest", "host": "h", "pid": 1, "partitions": "0,1"}',
    b'{"instance": "a", "role": "ingest", "host": "h", "pid": 1, "lag": {"t[0]": 1.5}}',
    b'{"instance": "a", "role": "ingest", "host": "h", "pid": 1, "state": "sleeping"}',
    b"\xff\xfe",
])
def test_a_bad_record_is_a_value_error(value: bytes) -> None:
    with pytest.raises(ValueError):
        InstanceStatus.from_json(value)


def test_instance_ids() -> None:
    assert default_instance_id() == f"{socket.gethostname()}-{os.getpid()}"
    assert instance_id(CasmSettings()) == default_instance_id()
    assert instance_id(CasmSettings(scale={"instance_id": "ingest-2"})) == "ingest-2"


def test_lag_by_key_leaves_out_unknown_lag() -> None:
    from kafka import TopicPartition

    assert lag_by_key({TopicPartition("b", 1): 4, TopicPartition("b", 0): None, TopicPartition("a", 3): 0}) == {
        "a[3]": 0, "b[1]": 4}


# ------------------------------------------------------------------------------ the reporter


class FakeOutcome:
    def __init__(self, ok: bool) -> None:
        self.ok = self.done = ok

    def wait(self, timeout_s: float | None = None) -> bool:
        return self.ok


class FakeProducer:
    """Records every send; `acknowledge` says whether outcomes succeed, `raises` makes send raise."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, InstanceStatus]] = []
        self.acknowledge = True
        self.raises: Exception | None = None

    def send(self, topic, key=None, value=None, on_ack=None, on_fail=None):
        if self.raises is not None:
            raise self.raises
        self.sent.append((topic, key, InstanceStatus.from_json(value)))
        if not self.acknowledge:
            on_fail(TimeoutError("no broker"))
        return FakeOutcome(self.acknowledge)


def test_reporter_sends_at_most_once_per_period() -> None:
    producer = FakeProducer()
    snapshots = iter(range(100))
    reporter = StatusReporter(producer, "casm.status", 2.0,
                              lambda: status("ingest-1", events_applied=next(snapshots), at=0.0))
    sent = [reporter.maybe_publish(t) for t in (100.0, 100.5, 101.9, 102.0, 103.0, 104.5)]
    assert sent == [True, False, False, True, False, True]
    assert [(topic, key) for topic, key, _ in producer.sent] == [("casm.status", b"ingest-1")] * 3
    records = [s for _, _, s in producer.sent]
    assert [s.events_applied for s in records] == [0, 1, 2]  # a snapshot only when one is sent
    assert all(s.at > NOW and s.state == "running" for s in records)  # stamped with the send's time
    assert reporter.published == 3 and reporter.failed == 0


def test_reporter_never_raises_for_a_failed_send(caplog: pytest.LogCaptureFixture) -> None:
    producer = FakeProducer()
    reporter = StatusReporter(producer, "casm.status", 1.0, lambda: status("ingest-1"))
    producer.raises = RuntimeError("producer closed")
    with caplog.at_level(logging.DEBUG, logger="consumers.serve.status"):
        assert reporter.maybe_publish(0.0) is True
        producer.raises = None
        producer.acknowledge = False  # delivery fails after the producer's retries
        assert reporter.maybe_publish(1.0) is True
        assert reporter.publish_stopped(0.1) is False
    assert reporter.failed == 3 and reporter.published == 2
    levels = [r.levelno for r in caplog.records if "not delivered" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]  # a warning once


def test_publish_stopped_sends_a_stopped_record_and_waits() -> None:
    producer = FakeProducer()
    reporter = StatusReporter(producer, "casm.status", 60.0, lambda: status("trainer", role="trainer"))
    assert reporter.maybe_publish(0.0)
    assert reporter.publish_stopped(1.0) is True  # regardless of the period
    assert [s.state for _, _, s in producer.sent] == ["running", STOPPED]


# ------------------------------------------------------------------------------ the table


def test_partition_ranges_and_sharing() -> None:
    assert partition_ranges([8, 0, 1, 2, 5, 7, 2]) == "0-2,5,7-8"
    assert partition_ranges([]) == "-"
    assert shared_partitions([status("a", partitions=[0, 1]), status("b", partitions=[1, 2]),
                              status("c", partitions=[1])]) == {1: ["a", "b", "c"]}


def test_states_shown() -> None:
    assert shown_state(status("a", at=NOW - 5.0), NOW, 6.0) == "running"
    assert shown_state(status("a", at=NOW - 7.0), NOW, 6.0) == "stale"
    assert shown_state(status("a", at=NOW - 70.0, state=STOPPED), NOW, 6.0) == "stopped"


def test_table_of_a_healthy_deployment() -> None:
    statuses = {s.instance: s for s in [
        status("ingest-1", partitions=[0, 1], lag={"b[0]": 2, "b[1]": 3}),
        status("ingest-2", partitions=[2, 3], lag={"b[2]": 0, "b[3]": 0}),
        status("trainer", role="trainer", partitions=[0, 1, 2, 3], model_version=4, model_loaded_at=None),
    ]}
    text = format_status(statuses, NOW, 6.0, expected_partitions=4)
    lines = text.splitlines()
    assert lines[0].split() == ["instance", "role", "state", "partitions", "lag", "model", "published_s",
                                "loaded_s", "events", "age_s"]
    assert lines[1].split() == ["ingest-1", "ingest", "running", "0-1", "5", "3", "30.0", "20.0", "10", "1.0"]
    assert lines[3].split() == ["trainer", "trainer", "running", "0-3", "-", "4", "30.0", "-", "10", "1.0"]
    assert lines[4] == "model: every running ingest instance serves version 3 (trainer at version 4)"
    assert lines[5] == "partitions: all 4 held by exactly one running instance each (no overlap)"


def test_table_flags_version_mismatch_overlap_and_gaps_among_running_instances_only() -> None:
    statuses = {s.instance: s for s in [
        status("ingest-1", partitions=[0, 1, 2]),
        status("ingest-2", partitions=[2, 3], model_version=2),
        status("ingest-3", partitions=[4], model_version=1, at=NOW - 60.0),  # stale: not counted
        status("ingest-4", partitions=[0], model_version=1, state=STOPPED),  # stopped: not counted
    ]}
    lines = format_status(statuses, NOW, 6.0, expected_partitions=6).splitlines()
    assert [line.split()[2] for line in lines[1:5]] == ["running", "running", "stale", "stopped"]
    assert lines[5] == "model: running ingest instances serve DIFFERENT versions: ingest-1=3, ingest-2=2"
    assert lines[6] == ("partitions: held by two or more instances: 2 (ingest-1, ingest-2); "
                        "held by no running instance: 4-5")
    without_count = format_status({"a": status("a", partitions=[0, 1])}, NOW, 6.0).splitlines()
    assert without_count[-1] == "partitions: 0-1 held by exactly one running instance each (no overlap)"


def test_table_without_running_instances() -> None:
    lines = format_status({"a": status("a", state=STOPPED)}, NOW, 6.0).splitlines()
    assert lines[-2:] == ["model: no running ingest instance",
                          "partitions: no running instance holds behaviours partitions"]


def test_status_needs_a_cluster(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("CASM_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    assert main(["status"]) == 2
    assert "status needs a running cluster" in caplog.text and "--kafka.bootstrap-servers" in caplog.text


# ------------------------------------------------------------------------------ with a broker


@pytest.fixture
def status_topic(kafka_bootstrap: str, kafka_config, topic_names) -> str:
    from stream.topics import ensure_topics

    counts = ensure_topics(kafka_bootstrap, kafka_config, topic_names)
    assert counts[topic_names.status] == 1
    return topic_names.status


@pytest.mark.integration
def test_published_statuses_read_back(kafka_bootstrap: str, kafka_config, status_topic: str,
                                      caplog: pytest.LogCaptureFixture) -> None:
    from stream.clients import make_producer
    from stream.delivery import acknowledged_producer

    assert read_status(kafka_config, kafka_bootstrap, status_topic, 30.0) == {}  # empty topic
    producer = acknowledged_producer(kafka_config, kafka_bootstrap, make_producer)
    try:
        applied = iter([100, 250])
        ingest = StatusReporter(producer, status_topic, 60.0, lambda: status(
            "ingest-1", partitions=[0, 1], lag={"b[0]": 1}, events_applied=next(applied)))
        trainer = StatusReporter(producer, status_topic, 60.0, lambda: status(
            "trainer", role="trainer", partitions=[0, 1, 2, 3], model_version=5))
        assert ingest.maybe_publish(0.0) and trainer.maybe_publish(0.0)
        producer.send(status_topic, key=b"junk", value=b"not a status record")
        assert ingest.publish_stopped(30.0)  # the newest record of ingest-1
        assert producer.flush(30.0)
    finally:
        producer.close(10.0)
    with caplog.at_level(logging.WARNING, logger="consumers.serve.status"):
        found = read_status(kafka_config, kafka_bootstrap, status_topic, 30.0)
    assert set(found) == {"ingest-1", "trainer"}
    assert (found["ingest-1"].state, found["ingest-1"].events_applied, found["ingest-1"].lag) == (
        STOPPED, 250, {"b[0]": 1})
    assert replace(found["trainer"], at=0.0) == status("trainer", role="trainer", partitions=[0, 1, 2, 3],
                                                       model_version=5, at=0.0)
    assert "no status record" in caplog.text  # the junk record was skipped
    # Only the last two records: the junk and ingest-1's stopped record.
    assert set(read_status(kafka_config, kafka_bootstrap, status_topic, 30.0, tail=2)) == {"ingest-1"}


@pytest.mark.integration
def test_status_command_prints_json_and_exits_by_what_it_found(
        kafka_bootstrap: str, kafka_config, topic_names, status_topic: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    from stream.clients import make_producer
    from stream.delivery import acknowledged_producer

    argv = ["status", "--kafka.bootstrap-servers", kafka_bootstrap, "--topics.status", status_topic,
            "--topics.behaviours", topic_names.behaviours, "--timeout-s", "30"]
    assert main([*argv, "--json"]) == 1  # no record yet
    assert json.loads(capsys.readouterr().out) == {}
    producer = acknowledged_producer(kafka_config, kafka_bootstrap, make_producer)
    try:
        for name, parts in (("ingest-1", [0, 1]), ("ingest-2", [2, 3])):
            record = status(name, partitions=parts)
            assert StatusReporter(producer, status_topic, 1.0, lambda r=record: r).publish_stopped(30.0)
    finally:
        producer.close(10.0)
    assert main([*argv, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed) == ["ingest-1", "ingest-2"]
    assert printed["ingest-2"]["partitions"] == [2, 3] and printed["ingest-2"]["state"] == STOPPED
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "ingest-1" in table and "stopped" in table
    assert "partitions: no running instance holds behaviours partitions" in table
