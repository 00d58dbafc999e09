"""Replay producer without a broker: pacing, encoding, reporting (a fake producer records sends)."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest

from stream.config import EventLimits, SyntheticConfig
from stream.decode import EventValidator
from stream.logs import LOG_EVENT_SCHEMA
from stream.replay import Pacing, encode_events, parse_pacing, replay
from stream.synthetic import generate


class FakeFuture:
    def __init__(self, error=None):
        self.error = error

    def add_errback(self, callback):
        if self.error is not None:
            callback(self.error)
        return self


class FakeProducer:
    def __init__(self, fail_every: int = 0):
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.times: list[float] = []
        self.flushed = 0
        self.fail_every = fail_every

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, key, value))
        self.times.append(time.monotonic())
        failing = self.fail_every and len(self.sent) % self.fail_every == 0
        return FakeFuture(RuntimeError("broker said no") if failing else None)

    def flush(self, timeout=None):
        self.flushed += 1


def table(n: int, gap: float = 1.0, users: int = 3) -> pa.Table:
    return pa.table(
        {
            "user_id": [f"ü{i % users}" for i in range(n)],
            "item_id": [f"i,{i}" for i in range(n)],
            "behavior": ["pv" if i % 2 else "buy" for i in range(n)],
            "timestamp": [1_600_000_000.0 + gap * i for i in range(n)],
        },
        schema=LOG_EVENT_SCHEMA,
    )


@pytest.mark.parametrize(
    ("speed", "rate", "fastest", "expected"),
    [
        ("60x", None, False, Pacing("speed", 60)),
        ("2.5", None, False, Pacing("speed", 2.5)),
        (None, "5000/s", False, Pacing("rate", 5000)),
        (None, "1e3", False, Pacing("rate", 1000)),
        (None, None, True, Pacing("max")),
        (None, None, False, Pacing("max")),
    ],
)
def test_parse_pacing(speed, rate, fastest, expected):
    assert parse_pacing(speed, rate, fastest) == expected


@pytest.mark.parametrize(("speed", "rate"), [("fast", None), (None, "5000/min"), ("0x", None), ("60x", "1/s")])
def test_parse_pacing_rejects(speed, rate):
    with pytest.raises(ValueError):
        parse_pacing(speed, rate)


def test_encoded_messages_are_valid_events_keyed_by_user():
    events = table(5)
    validator = EventValidator(EventLimits(), ["pv", "buy"])
    encoded = list(encode_events(events, "src.csv", context={"synthetic": True}))
    for row, (key, value) in enumerate(encoded):
        event = validator.validate(value, now=2e9)
        assert key == event.user_id.encode("utf-8")
        assert event.event_id == f"src.csv:{row}"
        assert event.context == {"synthetic": True}
        assert (event.user_id, event.item_id, event.behavior, event.timestamp) == tuple(
            events.slice(row, 1).to_pylist()[0].values()
        )


def test_replay_max_sends_every_row_in_order_and_reports():
    producer = FakeProducer()
    report = replay(table(10), producer, "topic-a", source_name="s", progress=False)
    assert [json.loads(v)["event_id"] for _, _, v in producer.sent] == [f"s:{i}" for i in range(10)]
    assert {t for t, _, _ in producer.sent} == {"topic-a"}
    assert producer.flushed == 1
    assert (report.events, report.sent, report.failed, report.users) == (10, 10, 0, 3)
    assert report.first_timestamp == 1_600_000_000.0 and report.last_timestamp == 1_600_000_009.0
    assert not report.synthetic and "sent        10 of 10" in report.summary()


def test_replay_limit_and_failures_are_reported():
    producer = FakeProducer(fail_every=3)
    report = replay(table(10), producer, "t", limit=7, progress=False)
    assert len(producer.sent) == 7
    assert (report.events, report.sent, report.failed) == (7, 5, 2)
    assert "broker said no" in report.first_error


def test_rate_pacing_spreads_sends():
    producer = FakeProducer()
    replay(table(41), producer, "t", Pacing("rate", 400.0), progress=False)
    # 40 gaps at 400/s take at least 0.1 s (sleep never returns early); no upper bound is asserted.
    assert producer.times[-1] - producer.times[0] >= 0.1 - 0.003


def test_speed_pacing_follows_event_time():
    producer = FakeProducer()
    replay(table(11, gap=6.0), producer, "t", Pacing("speed", 600.0), progress=False)
    # 60 s of event time at 600x is 0.1 s of wall time.
    assert producer.times[-1] - producer.times[0] >= 0.1 - 0.003


def test_synthetic_tables_are_labelled():
    stream = generate(SyntheticConfig(n_events=50, n_users=5, n_items=10))
    producer = FakeProducer()
    report = replay(stream.events, producer, "t", source_name=stream.source_name, progress=False)
    assert report.synthetic
    assert all(json.loads(v)["context"] == {"synthetic": True} for _, _, v in producer.sent)
