"""Hypothesis strategies of malformed `behaviours` messages, each invalid by construction, with the
dead-letter kinds it may get. Shared by the unit and the integration tests."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from stream.config import MIN_PLAUSIBLE_TIMESTAMP

VOCAB = ("pv", "cart", "fav", "buy")
NOW = 1_800_000_000.0
MAX_MESSAGE_BYTES = 16 * 1024

valid_fields = st.fixed_dictionaries(
    {
        "user_id": st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
        "item_id": st.one_of(st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
                             st.integers(0, 2**40)),
        "behavior": st.sampled_from(VOCAB),
        "timestamp": st.floats(MIN_PLAUSIBLE_TIMESTAMP, NOW, allow_nan=False, allow_infinity=False),
    }
)


def encode(fields: dict) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode("utf-8")


not_an_object = st.binary(max_size=300).filter(lambda b: not b.lstrip().startswith(b"{"))
wrong_json_type = st.one_of(
    st.lists(st.integers(), max_size=5), st.integers(), st.text(max_size=20), st.none(), st.booleans()
).map(encode)
bad_value = st.one_of(
    st.booleans(), st.floats(allow_nan=False).filter(lambda f: f != int(f) if abs(f) < 1e15 else True),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.none(),
)


@st.composite
def wrong_type(draw) -> bytes:
    fields = draw(valid_fields)
    field = draw(st.sampled_from(["user_id", "item_id", "behavior", "timestamp"]))
    value = draw(bad_value)
    if field == "timestamp":
        value = draw(st.one_of(st.booleans(), st.text(max_size=12), st.none(), st.lists(st.floats(), max_size=2)))
    fields[field] = value
    return encode(fields)


@st.composite
def missing_field(draw) -> bytes:
    fields = draw(valid_fields)
    del fields[draw(st.sampled_from(sorted(fields)))]
    return encode(fields)


@st.composite
def unknown_behaviour(draw) -> bytes:
    fields = draw(valid_fields)
    fields["behavior"] = draw(st.text(min_size=1, max_size=10).filter(lambda b: b not in VOCAB))
    return encode(fields)


@st.composite
def extra_field(draw) -> bytes:
    fields = draw(valid_fields)
    name = draw(st.text(min_size=1, max_size=10).filter(lambda n: n not in (*fields, "event_id", "context")))
    fields[name] = draw(st.integers())
    return encode(fields)


@st.composite
def huge(draw) -> bytes:
    fields = draw(valid_fields)
    fields["context"] = {"pad": "x" * draw(st.integers(MAX_MESSAGE_BYTES, 5 * MAX_MESSAGE_BYTES))}
    return encode(fields)


@st.composite
def future(draw) -> bytes:
    fields = draw(valid_fields)
    fields["timestamp"] = draw(st.floats(NOW + 2 * 86_400, 1e15))
    return encode(fields)


@st.composite
def truncated_json(draw) -> bytes:
    raw = encode(draw(valid_fields))
    return raw[: draw(st.integers(0, len(raw) - 1))]


garbage = st.one_of(
    not_an_object.map(lambda b: ("bytes", b)),
    wrong_json_type.map(lambda b: ("json_type", b)),
    wrong_type().map(lambda b: ("wrong_type", b)),
    missing_field().map(lambda b: ("missing", b)),
    unknown_behaviour().map(lambda b: ("unknown_behaviour", b)),
    extra_field().map(lambda b: ("extra", b)),
    huge().map(lambda b: ("huge", b)),
    future().map(lambda b: ("future", b)),
    truncated_json().map(lambda b: ("truncated", b)),
    st.just(("empty", None)),
)
"""(label, value) of a malformed message; value None is a tombstone (no value)."""

EXPECTED_KINDS = {
    "bytes": {"invalid_json", "invalid_event"},
    "json_type": {"invalid_event"},
    "wrong_type": {"invalid_event", "unknown_behaviour"},  # behavior: false is no known name
    "missing": {"invalid_event"},
    "unknown_behaviour": {"unknown_behaviour"},
    "extra": {"invalid_event"},
    "huge": {"too_large"},
    "future": {"future_timestamp"},
    "truncated": {"invalid_json"},
    "empty": {"empty"},
}
