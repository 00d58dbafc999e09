"""The messages on our topics, as pydantic models. The wire format is JSON (UTF-8), one object per
Kafka message; the JSON Schemas in ``stream/schemas/`` are generated from these models
(``casm schemas``) so that other teams can produce and consume in any language.

- ``behaviours``: `BehaviourEvent`, keyed by ``user_id`` (UTF-8) so one user's events stay in order
  on one partition.
- ``recommendations``: `Recommendation`, keyed by ``user_id``.
- ``behaviours.dlq``: `DeadLetter`, keyed by the rejected message's own key.

Decisions on the event contract:

- ``user_id``, ``item_id`` and ``event_id`` are strings (1..``max_id_length`` characters). Producers
  whose ids are integers may send JSON integers (0 <= id < 2**63, at most ``max_id_length`` digits):
  they are turned into their decimal string, so ``7`` and ``"7"`` are the same user. Floats,
  booleans, negative numbers and null are rejected (``1.0`` is not an id).
- ``timestamp`` is the event time in unix **seconds** (a JSON number; integers are fine), finite,
  >= ``min_timestamp`` and not later than the consumer's wall clock plus ``max_future_skew_s`` (the
  last check needs the clock, so `stream.decode.EventValidator` makes it, not the model; a value in
  milliseconds fails it).
- ``behavior`` must be in the configured vocabulary unless ``open_vocabulary`` is set.
- ``context`` is any JSON object up to ``max_context_bytes`` (compact JSON); keys other than the six
  fields are rejected (put free-form data in ``context``), so a misspelt field is an error rather
  than silently lost. Validation is strict: ``"17"`` is not a timestamp.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

import pydantic_core
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    create_model,
)

from stream.config import EventLimits

MAX_INT_ID = 2**63 - 1
"""Largest integer id accepted (a signed 64-bit integer, what most producers' ids fit in)."""

WIRE_ENCODING = "utf-8"


def _id_type(max_length: int, what: str, as_text: bool = True) -> Any:
    """A non-empty string of at most `max_length` characters, or a non-negative JSON integer that is
    turned into its decimal string (kept an int with `as_text` False, for a caller that needs to
    know which it was)."""
    largest_int = min(MAX_INT_ID, 10**max_length - 1)
    integer = Annotated[int, Field(ge=0, le=largest_int), AfterValidator(str)] if as_text else Annotated[
        int, Field(ge=0, le=largest_int)]
    return Annotated[
        Union[  # noqa: UP007 - Annotated members need the Union spelling
            Annotated[str, Field(min_length=1, max_length=max_length)],
            integer,
        ],
        Field(
            union_mode="left_to_right",
            description=f"{what}: 1 to {max_length} characters; a non-negative integer is accepted "
            "and becomes its decimal string.",
        ),
    ]


def context_size_error(context: dict[str, Any], max_bytes: int) -> str | None:
    """Why `context` is too large (its compact JSON exceeds `max_bytes`), or None."""
    size = len(pydantic_core.to_json(context))
    if size > max_bytes:
        return f"context is {size} bytes of JSON, more than the limit of {max_bytes}"
    return None


def _context_size_check(max_bytes: int) -> AfterValidator:
    def check(context: dict[str, Any]) -> dict[str, Any]:
        error = context_size_error(context, max_bytes)
        if error:
            raise ValueError(error)
        return context

    return AfterValidator(check)


def behaviour_event_model(
    limits: EventLimits | None = None,
    vocabulary: Sequence[str] | None = None,
    check_context_size: bool = True,
    ids_as_text: bool = True,
) -> type[BaseModel]:
    """The `BehaviourEvent` model for these limits. With a `vocabulary` (and a closed vocabulary in
    `limits`) ``behavior`` must be one of its names; otherwise any non-empty name of at most
    ``max_id_length`` characters is accepted. `check_context_size` False leaves the context size
    check to the caller (`stream.decode` does it only when the message is large enough to matter). `ids_as_text` False
    keeps integer ids as ints (`stream.decode` converts them itself)."""
    limits = limits or EventLimits()
    closed = vocabulary is not None and not limits.open_vocabulary
    if closed:
        if not vocabulary:
            raise ValueError("a closed behaviour vocabulary needs at least one name")
        behaviour_type: Any = Literal[tuple(vocabulary)]  # type: ignore[valid-type]
        behaviour_text = f"Behaviour name, one of {list(vocabulary)}."
    else:
        behaviour_type = Annotated[str, Field(min_length=1, max_length=limits.max_id_length)]
        behaviour_text = (
            "Behaviour name (the deployment's vocabulary, e.g. pv, cart, fav, buy; unknown names are "
            "rejected unless the vocabulary is open)."
        )
    id_type = _id_type(limits.max_id_length, "id", ids_as_text)
    context_type: Any = (
        Annotated[dict[str, Any], _context_size_check(limits.max_context_bytes)]
        if check_context_size
        else dict[str, Any]
    )
    return create_model(
        "BehaviourEvent",
        __config__=ConfigDict(
            strict=True,
            extra="forbid",
            frozen=True,
            title="BehaviourEvent",
            json_schema_extra={
                "description": (
                    "One behaviour of a user on an item, produced to the `behaviours` topic as a JSON "
                    "object, keyed by user_id (UTF-8). At most "
                    f"{limits.max_message_bytes} bytes per message. Timestamps later than the "
                    f"consumer's clock + {limits.max_future_skew_s:g} s are rejected."
                )
            },
        ),
        __doc__="One behaviour event on the wire (see the module docstring for the contract).",
        user_id=(id_type, Field(description="The user (the message key is the same string).")),
        item_id=(id_type, Field(description="The item.")),
        behavior=(behaviour_type, Field(description=behaviour_text)),
        timestamp=(
            Annotated[float, Field(ge=limits.min_timestamp, allow_inf_nan=False)],
            Field(description=f"Event time in unix seconds (>= {limits.min_timestamp:g})."),
        ),
        event_id=(
            Union[id_type, None],  # noqa: UP007
            Field(None, description="Producer's id of this event; redeliveries keep it (deduplication)."),
        ),
        context=(
            Union[context_type, None],  # noqa: UP007
            Field(
                None,
                description=f"Free-form JSON object, at most {limits.max_context_bytes} bytes as "
                'compact JSON. Synthetic events carry {"synthetic": true}.',
            ),
        ),
    )


BehaviourEvent = behaviour_event_model()
"""The event model with the default limits and an open vocabulary (what the published schema says;
the service validates with `behaviour_event_model(limits, vocabulary)`)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json_bytes(self) -> bytes:
        """The message value on the wire."""
        return self.__pydantic_serializer__.to_json(self)


class RecommendedItem(_Model):
    """One recommended item and its score."""

    item_id: str = Field(min_length=1, description="The item.")
    score: float = Field(allow_inf_nan=False, description="Model score (higher is better; not a probability).")


class Recommendation(_Model):
    """Top-K recommendations for one user, produced to `recommendations` keyed by user_id."""

    model_config = ConfigDict(
        title="Recommendation",
        json_schema_extra={"description": "Top-K items for one user, keyed by user_id (UTF-8)."},
    )

    user_id: str = Field(min_length=1, description="The user.")
    items: list[RecommendedItem] = Field(description="Ranked items, best first.")
    model_version: str = Field(description="Version of the model that scored them.")
    generated_at: float = Field(allow_inf_nan=False, description="Wall-clock time of scoring (unix s).")
    event_time: float | None = Field(
        None, allow_inf_nan=False,
        description="Event time (unix s) of the user's newest event these recommendations reflect.",
    )
    event_partition: int | None = Field(
        None, ge=0, description="Partition of that event in the behaviours topic."
    )
    event_offset: int | None = Field(
        None, ge=0, description="Offset of that event itself in its partition (not the next one to read)."
    )
    event_produced_ms: int | None = Field(
        None, ge=0, description="Kafka record time (unix ms) of that event: freshness is measured from it."
    )
    source: Literal["model", "popularity", "recent"] = Field(
        "model", description="'model': scored by CASM for this user; 'popularity': the most popular items "
        "(no usable history, no trained model yet, or the popularity baseline); 'recent': the recent-items "
        "baseline (the user's recently seen items, newest first, then the most popular)."
    )


def _b64_in(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not standard base64: {exc}") from None
    return value


def _b64_out(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_b64_in),
    PlainSerializer(_b64_out, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]
"""Bytes that travel as standard base64 (RFC 4648 section 4, with padding) in JSON."""

DeadLetterKind = Literal[
    "empty",  # no value (a tombstone)
    "too_large",  # value longer than max_message_bytes
    "invalid_json",  # not JSON, or not UTF-8
    "invalid_event",  # JSON, but not a valid event (types, missing or extra fields, limits)
    "unknown_behaviour",  # behaviour outside a closed vocabulary
    "future_timestamp",  # timestamp later than now + max_future_skew_s (often: milliseconds)
    "internal",  # an unexpected error while decoding (a bug: the message is kept for a replay)
    "duplicate_key",  # JSON with a key twice in one object (ambiguous: which value counts?)
    "conflicting_duplicate",  # a known event_id with different content (the first one stays applied)
]
DEAD_LETTER_KINDS: tuple[str, ...] = DeadLetterKind.__args__  # type: ignore[attr-defined]


class DeadLetter(_Model):
    """A message of `behaviours` that was not accepted, with why; produced to `behaviours.dlq`
    keyed by the original key."""

    model_config = ConfigDict(
        title="DeadLetter",
        json_schema_extra={
            "description": "A rejected behaviours message: where it was, why, and its bytes (base64)."
        },
    )

    topic: str = Field(description="Topic the message was read from.")
    partition: int = Field(ge=0, description="Its partition.")
    offset: int = Field(ge=0, description="Its offset.")
    key: Base64Bytes | None = Field(None, description="Its key (base64), if any.")
    original: Base64Bytes = Field(description="Its value (base64), cut to a bound; see truncated.")
    original_size: int = Field(ge=0, description="Length of the whole original value in bytes.")
    original_sha256: str | None = Field(
        None, description="SHA-256 (hex) of the whole original value, so a cut value can be matched."
    )
    key_size: int | None = Field(None, ge=0, description="Length of the whole original key in bytes.")
    key_truncated: bool = Field(False, description="Whether `key` holds only the start of the original key.")
    key_sha256: str | None = Field(None, description="SHA-256 (hex) of the whole original key, if any.")
    truncated: bool = Field(False, description="Whether `original` holds only the start of the value.")
    produced_ms: int | None = Field(None, description="Kafka record timestamp of the message (ms).")
    kind: DeadLetterKind = Field(description="Category of the rejection (for counting).")
    reason: str = Field(description="Why it was rejected, in words.")
    dead_at: float = Field(description="Wall-clock time of the rejection (unix s).")
