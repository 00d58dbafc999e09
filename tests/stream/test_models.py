"""The wire contract of behaviour events, recommendations and dead letters."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from stream.config import EventLimits
from stream.models import (
    BehaviourEvent,
    DeadLetter,
    Recommendation,
    RecommendedItem,
    behaviour_event_model,
)

VOCAB = ["pv", "cart", "fav", "buy"]
GOOD = {"user_id": "u1", "item_id": "i1", "behavior": "pv", "timestamp": 1_700_000_000.5}


def parse(fields: dict, limits: EventLimits | None = None, vocabulary=VOCAB):
    model = behaviour_event_model(limits or EventLimits(), vocabulary)
    return model.model_validate_json(json.dumps(fields))


def test_valid_event_with_optional_fields():
    event = parse({**GOOD, "event_id": "log:1", "context": {"synthetic": True, "page": [1, 2]}})
    assert (event.user_id, event.item_id, event.behavior) == ("u1", "i1", "pv")
    assert event.timestamp == 1_700_000_000.5
    assert event.event_id == "log:1"
    assert event.context == {"synthetic": True, "page": [1, 2]}


def test_optional_fields_default_to_none():
    event = parse(GOOD)
    assert event.event_id is None and event.context is None


def test_integer_ids_become_strings():
    event = parse({**GOOD, "user_id": 42, "item_id": 0, "event_id": 7, "timestamp": 1_700_000_000})
    assert (event.user_id, event.item_id, event.event_id) == ("42", "0", "7")
    assert event.timestamp == 1_700_000_000.0


@pytest.mark.parametrize(
    "change",
    [
        {"user_id": 1.0},
        {"user_id": True},
        {"user_id": -3},
        {"user_id": None},
        {"user_id": ""},
        {"user_id": "x" * 129},
        {"item_id": ["a"]},
        {"item_id": 2**63},
        {"behavior": "click"},
        {"behavior": 1},
        {"timestamp": "1700000000"},
        {"timestamp": True},
        {"timestamp": -1},
        {"timestamp": None},
        {"event_id": "e" * 129},
        {"event_id": 1.5},
        {"context": [1, 2]},
        {"context": "text"},
        {"context": {"blob": "x" * 5000}},
        {"extra_field": 1},
    ],
)
def test_invalid_events_are_rejected(change):
    with pytest.raises(ValidationError):
        parse({**GOOD, **change})


@pytest.mark.parametrize("missing", ["user_id", "item_id", "behavior", "timestamp"])
def test_missing_required_field(missing):
    fields = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ValidationError):
        parse(fields)


@pytest.mark.parametrize("text", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_timestamp_rejected(text):
    model = behaviour_event_model(EventLimits(), VOCAB)
    raw = b'{"user_id":"u","item_id":"i","behavior":"pv","timestamp":' + text + b"}"
    with pytest.raises(ValidationError):
        model.model_validate_json(raw)


def test_min_timestamp_and_id_length_follow_limits():
    limits = EventLimits(max_id_length=4, min_timestamp=1_000_000_000)
    with pytest.raises(ValidationError):
        parse({**GOOD, "user_id": "abcde"}, limits)
    with pytest.raises(ValidationError):
        parse({**GOOD, "user_id": 10_000}, limits)  # five digits
    assert parse({**GOOD, "user_id": 9_999}, limits).user_id == "9999"
    with pytest.raises(ValidationError):
        parse({**GOOD, "timestamp": 999_999_999}, limits)


def test_open_vocabulary_accepts_new_behaviours():
    assert parse({**GOOD, "behavior": "share"}, EventLimits(open_vocabulary=True)).behavior == "share"
    assert parse({**GOOD, "behavior": "share"}, vocabulary=None).behavior == "share"
    with pytest.raises(ValidationError):
        parse({**GOOD, "behavior": ""}, EventLimits(open_vocabulary=True))


def test_context_limit_counts_compact_json():
    limits = EventLimits(max_context_bytes=20)
    assert parse({**GOOD, "context": {"k": "x" * 10}}, limits).context == {"k": "x" * 10}
    with pytest.raises(ValidationError):
        parse({**GOOD, "context": {"k": "x" * 20}}, limits)


def test_canonical_model_round_trips():
    event = BehaviourEvent(user_id="u", item_id="i", behavior="cart", timestamp=1.7e9, event_id="e")
    again = BehaviourEvent.model_validate_json(event.model_dump_json())
    assert again == event


def test_dead_letter_bytes_are_standard_base64():
    letter = DeadLetter(
        topic="behaviours", partition=2, offset=10, key=b"\xfb\xff", original=b"\xff\xfe>>??",
        original_size=6, kind="invalid_json", reason="not JSON", dead_at=1.0,
    )
    wire = json.loads(letter.to_json_bytes())
    assert wire["original"] == "//4+Pj8/" and wire["key"] == "+/8="
    assert DeadLetter.model_validate_json(letter.to_json_bytes()) == letter


def test_dead_letter_rejects_bad_base64_and_unknown_kind():
    with pytest.raises(ValidationError):
        DeadLetter.model_validate_json(
            b'{"topic":"t","partition":0,"offset":0,"original":"%%%","original_size":1,'
            b'"kind":"invalid_json","reason":"r","dead_at":1}'
        )
    with pytest.raises(ValidationError):
        DeadLetter(topic="t", partition=0, offset=0, original=b"", original_size=0, kind="other",
                   reason="r", dead_at=1.0)


def test_recommendation_round_trip():
    rec = Recommendation(
        user_id="u1",
        items=[RecommendedItem(item_id="a", score=2.5), RecommendedItem(item_id="b", score=-1.0)],
        model_version="v3", generated_at=1_700_000_100.0, event_time=1_700_000_000.0,
        event_partition=1, event_offset=41,
    )
    assert Recommendation.model_validate_json(rec.to_json_bytes()) == rec
    with pytest.raises(ValidationError):
        RecommendedItem(item_id="a", score=float("nan"))
