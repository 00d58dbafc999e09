"""The ingest hot path: records -> event columns + dead letters, never an exception."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stream.config import EventLimits
from stream.decode import DECODED_SCHEMA, EventRejected, EventValidator, decode_behaviours
from stream.models import DEAD_LETTER_KINDS, behaviour_event_model

from .garbage import EXPECTED_KINDS, NOW, VOCAB, encode, garbage, valid_fields


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


def records(values, topic="behaviours", partition=0):
    return [Record(topic, partition, i, 1_700_000_000_000 + i, b"k%d" % i, v) for i, v in enumerate(values)]


@pytest.fixture(scope="module")
def validator():
    return EventValidator(EventLimits(), VOCAB)


def event(i: int, **change) -> bytes:
    return encode({"user_id": f"u{i % 3}", "item_id": f"i{i}", "behavior": "pv", "timestamp": 1e9 + i,
                   "event_id": f"e{i}", **change})


def test_decodes_columns_and_provenance(validator):
    table, dead = decode_behaviours(records([event(i) for i in range(5)], partition=3), validator, now=NOW)
    assert dead == []
    assert table.schema == DECODED_SCHEMA
    assert table.column("user_id").to_pylist() == ["u0", "u1", "u2", "u0", "u1"]
    assert table.column("event_id").to_pylist() == [f"e{i}" for i in range(5)]
    assert table.column("offset").to_pylist() == list(range(5))
    assert set(table.column("partition").to_pylist()) == {3}
    assert table.column("produced_ms").to_pylist()[0] == 1_700_000_000_000
    assert table.column("timestamp").type == pa.float64()


def test_empty_batch(validator):
    table, dead = decode_behaviours([], validator)
    assert table.num_rows == 0 and table.schema == DECODED_SCHEMA and dead == []


def test_bad_messages_become_dead_letters_in_place(validator):
    values = [event(0), b"{oops", event(1), None, event(2, behavior="click"), event(3, timestamp=1.7e12),
              b"x" * 20_000, event(4, user_id=True), event(5)]
    table, dead = decode_behaviours(records(values), validator, now=NOW)
    assert table.column("event_id").to_pylist() == ["e0", "e1", "e5"]
    kinds = {d.offset: d.kind for d in dead}
    assert kinds == {1: "invalid_json", 3: "empty", 4: "unknown_behaviour", 5: "future_timestamp",
                     6: "too_large", 7: "invalid_event"}
    future = next(d for d in dead if d.kind == "future_timestamp")
    assert "milliseconds" in future.reason
    for letter in dead:
        assert letter.reason and letter.topic == "behaviours" and letter.key == b"k%d" % letter.offset
        original = values[letter.offset] or b""
        assert letter.original == original[: EventLimits().dead_letter_max_bytes]
        assert letter.original_size == len(original)
        assert letter.truncated == (len(original) > EventLimits().dead_letter_max_bytes)


def test_dead_letter_original_is_bounded():
    validator = EventValidator(EventLimits(dead_letter_max_bytes=10), VOCAB)
    _, dead = decode_behaviours(records([b"y" * 100]), validator)
    assert dead[0].original == b"y" * 10 and dead[0].truncated and dead[0].original_size == 100


def test_unknown_behaviour_accepted_with_open_vocabulary():
    validator = EventValidator(EventLimits(open_vocabulary=True), VOCAB)
    table, dead = decode_behaviours(records([event(0, behavior="share")]), validator)
    assert dead == [] and table.column("behavior").to_pylist() == ["share"]


def test_validate_one(validator):
    assert validator.validate(event(1), now=NOW).item_id == "i1"
    with pytest.raises(EventRejected) as info:
        validator.validate(event(1, timestamp=NOW + 10 * 86_400), now=NOW)
    assert info.value.kind == "future_timestamp"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(valid_fields.map(lambda f: ("valid", encode(f))), garbage), max_size=30))
def test_every_record_is_either_an_event_or_a_dead_letter(validator, batch):
    table, dead = decode_behaviours(records([value for _, value in batch]), validator, now=NOW)
    valid = [i for i, (label, _) in enumerate(batch) if label == "valid"]
    assert table.column("offset").to_pylist() == valid
    assert sorted(d.offset for d in dead) == [i for i in range(len(batch)) if i not in valid]
    for letter in dead:
        label = batch[letter.offset][0]
        assert letter.kind in EXPECTED_KINDS[label], (label, letter)
        assert letter.kind in DEAD_LETTER_KINDS and 0 < len(letter.reason) <= 1000
    for row, i in zip(table.to_pylist(), valid, strict=True):
        fields = json.loads(batch[i][1])
        assert row["user_id"] == str(fields["user_id"]) and row["item_id"] == str(fields["item_id"])
        assert row["timestamp"] == fields["timestamp"]


@pytest.mark.parametrize("max_context", [64, 1000, 4096])
def test_skipped_context_checks_never_change_the_verdict(max_context):
    """The decoder checks the context size only for messages longer than max_context / 5; numbers
    like 1e15 (the worst inflation on re-serialization) must not slip through."""
    limits = EventLimits(max_context_bytes=max_context)
    validator = EventValidator(limits, VOCAB)
    strict = behaviour_event_model(limits, VOCAB, check_context_size=True)
    tokens = ["1e15", "-1E+15", "9e9", "1e5", '"\\u00e9"', "[1e15,2e15]", '{"a":1e15}']
    for token in tokens:
        for count in (1, 2, 5, 10, 30, 80, 200, 400):
            raw = (b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1,"context":{"n":['
                   + ",".join([token] * count).encode() + b"]}}")
            try:
                strict.model_validate_json(raw)
                expected = True
            except ValidationError:
                expected = False
            table, dead = decode_behaviours(records([raw]), validator)
            assert (table.num_rows == 1) is expected, (token, count, dead)


@pytest.mark.parametrize("value", [
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"user_id":"v"}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"user\\u005fid":"v"}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"a":1,"a":2}}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"timestamp":1.8e9}',
    b'{"user_id":1,"item_id":"i","behavior":"pv","timestamp":1.7e9,"user_id":2}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"a":1,"b":{"a":1,"a":2}}}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"event_id":null,"event_id":"e"}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"x":{"a":"1","a":"2"}}}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"l":[1,{"a":[],"a":"b"}]}}',
])
def test_json_with_a_key_twice_is_rejected_as_ambiguous(value: bytes) -> None:
    _, dead = decode_behaviours(records([value]), EventValidator(), now=NOW)
    assert [d.kind for d in dead] == ["duplicate_key"]
    assert "occurs twice" in dead[0].reason


@pytest.mark.parametrize("value", [
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"user_id":"item_id"}}',
    b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"a":{"a":["a","a"]}}}',
    b'{"user_id":"u\\"","item_id":"i","behavior":"pv","timestamp":1.7e9,"event_id":null}',
    b'{ "user_id" : "u" , "item_id":"i","behavior":"pv","timestamp":1.7e9,"context":{"s":"\\u0061"}}',
])
def test_json_without_a_repeated_key_is_accepted(value: bytes) -> None:
    table, dead = decode_behaviours(records([value]), EventValidator(), now=NOW)
    assert table.num_rows == 1, dead


@pytest.mark.parametrize("timestamp", [0, 1, 86_400, 315_532_799])
def test_timestamps_before_1980_are_rejected(timestamp: float) -> None:
    value = json.dumps({"user_id": "u", "item_id": "i", "behavior": "pv", "timestamp": timestamp}).encode()
    table, dead = decode_behaviours(records([value]), EventValidator(), now=NOW)
    assert table.num_rows == 0 and [d.kind for d in dead] == ["invalid_event"]
    assert "timestamp" in dead[0].reason


def test_a_long_key_is_cut_in_the_dead_letter_with_its_size_and_hash() -> None:
    record = records([b"not json"])[0]
    record.key = b"k" * 700_000
    letter = EventValidator().dead_letter(record, "invalid_json", "bad")
    assert len(letter.key) == EventLimits().dead_letter_max_key_bytes and letter.key_truncated
    assert letter.key_size == 700_000 and letter.key_sha256 == hashlib.sha256(record.key).hexdigest()
    assert letter.original_sha256 == hashlib.sha256(b"not json").hexdigest()


def test_the_duplicate_count_knows_every_field_of_the_event() -> None:
    # EventValidator.parse counts the strings of exactly these fields: a new one must be added there.
    assert set(EventValidator().model.model_fields) == {"user_id", "item_id", "behavior", "timestamp", "event_id",
                                                        "context"}


def test_integer_ids_become_their_decimal_strings() -> None:
    value = b'{"user_id":12,"item_id":0,"behavior":"pv","timestamp":1.7e9,"event_id":7}'
    table, dead = decode_behaviours(records([value]), EventValidator(), now=NOW)
    assert not dead
    assert table.select(["user_id", "item_id", "event_id"]).to_pylist() == [{"user_id": "12", "item_id": "0", "event_id": "7"}]

