"""The hot path of ingest: Kafka records of `behaviours` -> event columns + dead letters.

Build one `EventValidator` (vocabulary and limits) when the service starts and call
`decode_behaviours` on every polled batch. The cost per message is one pydantic-core
``validate_json`` of the event model plus a few list appends; columns are built once per batch.
Nothing raises on bad input: every record ends up either in the table or as a `DeadLetter`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ValidationError

from stream.config import EventLimits
from stream.models import DeadLetter, behaviour_event_model, context_size_error

log = logging.getLogger(__name__)

DECODED_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("behavior", pa.string()),
        ("timestamp", pa.float64()),
        ("event_id", pa.string()),
        ("topic", pa.string()),
        ("partition", pa.int32()),
        ("offset", pa.int64()),
        ("produced_ms", pa.int64()),
    ]
)
"""Columns of decoded events (DEVELOPERS.md): the log columns plus where each event came from.
``produced_ms`` is the Kafka record timestamp (ms); ``event_id`` is null when the producer sent none."""

MAX_REASON_CHARS = 1_000
"""Dead-letter reasons are cut to this length (a garbage message must not make a huge reason)."""

_MAX_REASON_ERRORS = 5

JSON_INFLATION_BOUND = 5
"""Re-serializing parsed JSON as compact JSON makes no text more than 4.5 times longer (the worst
case is a number like ``1e15`` -> ``1000000000000000.0``; whitespace, escapes and duplicate keys
only shrink). So a context inside a message of n bytes re-serializes to at most 5 n bytes, and the
context size check is skipped for messages with 5 n <= max_context_bytes."""


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def duplicate_key(value: bytes) -> str | None:
    """The first key that occurs twice in one JSON object of `value` (UTF-8 JSON), or None (also
    for text that is not JSON: the validator says why). Such JSON is ambiguous (RFC 8259: parsers
    differ on which value counts), so it is rejected rather than read "last key wins". A full
    parse: `EventValidator.parse` runs it only when the cheap count (`string_tokens`) cannot
    rule a repeat out."""
    try:
        json.loads(value, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as exc:
        return str(exc)
    except ValueError:
        return None
    return None


def string_tokens(value: Any) -> int:
    """The JSON strings (object keys and string values) of a parsed JSON value."""
    kind = type(value)
    if kind is str:
        return 1
    if kind is dict:
        count = len(value)
        for child in value.values():
            count += 1 if type(child) is str else string_tokens(child) if type(child) in (dict, list) else 0
        return count
    if kind is list:
        return sum(string_tokens(child) for child in value)
    return 0


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


class RecordLike(Protocol):
    """What `decode_behaviours` reads of a record (kafka-python's ConsumerRecord has it all)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


class EventRejected(ValueError):
    """A message that is not a valid behaviour event; `kind` is a `DeadLetter` kind."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _reason(exc: ValidationError) -> tuple[str, str]:
    """(kind, compact reason) of a validation error, without the input (which may be huge)."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    kind = "invalid_event"
    parts: list[str] = []
    for err in errors:
        loc = err.get("loc", ())
        field = str(loc[0]) if loc else "message"
        if err["type"] == "json_invalid":
            kind = "invalid_json"
        elif err["type"] == "literal_error" and field == "behavior":
            kind = "unknown_behaviour"
        text = f"{field}: {err['msg']}"
        if text not in parts:
            parts.append(text)
    shown = parts[:_MAX_REASON_ERRORS]
    more = len(parts) - len(shown)
    reason = "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    return kind, reason[:MAX_REASON_CHARS]


class EventValidator:
    """Validation of behaviour events for one deployment (vocabulary and limits), built once.

    `vocabulary` is the configured behaviour names; with ``limits.open_vocabulary`` any name is
    accepted (the state store appends new ones)."""

    def __init__(self, limits: EventLimits | None = None, vocabulary: Sequence[str] | None = None) -> None:
        self.limits = limits or EventLimits()
        self.vocabulary: tuple[str, ...] | None = tuple(vocabulary) if vocabulary is not None else None
        # The context size is checked here, only for messages long enough to break it (it costs a
        # Python call and a serialization per message otherwise).
        self.model: type[BaseModel] = behaviour_event_model(
            self.limits, self.vocabulary, check_context_size=False, ids_as_text=False
        )
        self._validate_json = self.model.__pydantic_validator__.validate_json
        self.max_message_bytes = self.limits.max_message_bytes
        self.max_context_bytes = self.limits.max_context_bytes
        self.context_check_from = self.limits.max_context_bytes // JSON_INFLATION_BOUND
        self.max_future_skew_s = self.limits.max_future_skew_s

    def latest_allowed(self, now: float | None = None) -> float:
        """The latest event time accepted at wall-clock time `now` (unix s)."""
        return (time.time() if now is None else now) + self.max_future_skew_s

    def parse(self, value: bytes | None) -> Any:
        """Every check but the clock's: size, JSON, fields, vocabulary, context size. Raises
        `EventRejected` or pydantic's ValidationError (`validate` turns it into EventRejected)."""
        if value is None:
            raise EventRejected("empty", "message has no value")
        if len(value) > self.max_message_bytes:
            raise EventRejected(
                "too_large", f"message is {len(value)} bytes, more than the limit of {self.max_message_bytes}"
            )
        event = self._validate_json(value)
        # Without a backslash every quote of the text opens or closes a string, so a text with no
        # key repeated has two quotes per string of the parsed event (keys set, string values;
        # integer ids stay ints here); a repeated key is one string more in the text.
        # (The fields: tests/stream/test_decode.py checks the model has no others.)
        strings = (len(event.model_fields_set) + 1 + (type(event.user_id) is str) + (type(event.item_id) is str)
                   + (type(event.event_id) is str) + (0 if event.context is None else string_tokens(event.context)))
        repeated = duplicate_key(value) if b"\\" in value or value.count(b'"') != 2 * strings else None
        if repeated is not None:
            raise EventRejected("duplicate_key", f"the key {repeated!r} occurs twice in one object: "
                                "ambiguous JSON is not accepted (send each key once)")
        if event.context is not None and len(value) > self.context_check_from:
            error = context_size_error(event.context, self.max_context_bytes)
            if error:
                raise EventRejected("invalid_event", error)
        return event

    def validate(self, value: bytes | None, now: float | None = None) -> BaseModel:
        """One message value -> the event model (integer ids stay ints; `decode_behaviours` writes their
        decimal strings), or `EventRejected` with kind and reason."""
        try:
            event = self.parse(value)
        except ValidationError as exc:
            raise EventRejected(*_reason(exc)) from None
        latest = self.latest_allowed(now)
        if event.timestamp > latest:
            raise EventRejected("future_timestamp", _future_reason(event.timestamp, latest))
        return event

    def dead_letter(self, record: RecordLike, kind: str, reason: str, now: float | None = None) -> DeadLetter:
        """The dead letter of `record` (its value cut to ``dead_letter_max_bytes``)."""
        value = record.value if record.value is not None else b""
        keep = self.limits.dead_letter_max_bytes
        keep_key = self.limits.dead_letter_max_key_bytes
        key = bytes(record.key) if record.key is not None else None
        produced = record.timestamp if record.timestamp is not None and record.timestamp >= 0 else None
        return DeadLetter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=None if key is None else key[:keep_key],
            key_size=None if key is None else len(key),
            key_truncated=key is not None and len(key) > keep_key,
            key_sha256=None if key is None else sha256_hex(key),
            original=bytes(value[:keep]),
            original_size=len(value),
            original_sha256=sha256_hex(bytes(value)),
            truncated=len(value) > keep,
            produced_ms=produced,
            kind=kind,  # type: ignore[arg-type]
            reason=reason[:MAX_REASON_CHARS],
            dead_at=time.time() if now is None else now,
        )


def _future_reason(timestamp: float, latest: float) -> str:
    hint = " (milliseconds? timestamps are unix seconds)" if timestamp > latest * 100 else ""
    return f"timestamp: {timestamp!r} is later than the clock allows ({latest:.0f}){hint}"


def empty_events() -> pa.Table:
    """A decoded-events table with no rows."""
    return DECODED_SCHEMA.empty_table()


def decode_behaviours(
    records: Iterable[RecordLike], validator: EventValidator, now: float | None = None
) -> tuple[pa.Table, list[DeadLetter]]:
    """Decode a batch of `behaviours` records.

    Returns the valid events as a table of `DECODED_SCHEMA` (in the order of `records`, which keeps
    each partition's offset order) and a dead letter for every other record. `now` (unix s) is the
    clock for the future-timestamp check; default: the wall clock. Never raises on bad input."""
    now = time.time() if now is None else now
    parse = validator.parse
    users: list[str] = []
    items: list[str] = []
    behaviours: list[str] = []
    times: list[float] = []
    event_ids: list[str | None] = []
    kept: list[RecordLike] = []
    dead: list[DeadLetter] = []
    for record in records:
        try:
            event = parse(record.value)
        except EventRejected as exc:
            dead.append(validator.dead_letter(record, exc.kind, exc.reason, now))
            continue
        except ValidationError as exc:
            dead.append(validator.dead_letter(record, *_reason(exc), now))
            continue
        except Exception as exc:  # noqa: BLE001 - bad input must never stop the loop
            log.exception("unexpected error decoding %s[%s]@%s", record.topic, record.partition, record.offset)
            dead.append(validator.dead_letter(record, "internal", f"{type(exc).__name__}: {exc}", now))
            continue
        user, item, event_id = event.user_id, event.item_id, event.event_id
        users.append(user if type(user) is str else str(user))
        items.append(item if type(item) is str else str(item))
        behaviours.append(event.behavior)
        times.append(event.timestamp)
        event_ids.append(event_id if event_id is None or type(event_id) is str else str(event_id))
        kept.append(record)

    ts = np.fromiter(times, dtype=np.float64, count=len(times))
    latest = validator.latest_allowed(now)
    future = ts > latest
    if future.any():
        keep_mask = ~future
        for index in np.flatnonzero(future):
            dead.append(
                validator.dead_letter(kept[index], "future_timestamp", _future_reason(float(ts[index]), latest), now)
            )
        idx = np.flatnonzero(keep_mask)
        users = [users[i] for i in idx]
        items = [items[i] for i in idx]
        behaviours = [behaviours[i] for i in idx]
        event_ids = [event_ids[i] for i in idx]
        kept = [kept[i] for i in idx]
        ts = ts[keep_mask]

    table = pa.Table.from_arrays(
        [
            pa.array(users, pa.string()),
            pa.array(items, pa.string()),
            pa.array(behaviours, pa.string()),
            pa.array(ts, pa.float64()),
            pa.array(event_ids, pa.string()),
            pa.array([r.topic for r in kept], pa.string()),
            pa.array([r.partition for r in kept], pa.int32()),
            pa.array([r.offset for r in kept], pa.int64()),
            pa.array([r.timestamp for r in kept], pa.int64()),
        ],
        schema=DECODED_SCHEMA,
    )
    return table, dead
