"""Normalising and checking a batch of events before the store applies it.

`normalize_events` brings an input table to the store's column types (or raises
`InvalidEventError` for a missing column or a type that cannot be cast); `check_events` finds the
rows the store must refuse, vectorised over the whole batch, so a caller can route them to a dead
letter topic before `apply` (which refuses the whole batch if any row is bad).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from state.errors import InvalidEventError

#: Columns every batch must carry, with the type the store keeps.
REQUIRED_COLUMNS: dict[str, pa.DataType] = {
    "user_id": pa.string(),
    "item_id": pa.string(),
    "behavior": pa.string(),
    "timestamp": pa.float64(),
    "topic": pa.string(),
    "partition": pa.int32(),
    "offset": pa.int64(),
}
#: Columns a batch may carry (filled with nulls when absent).
OPTIONAL_COLUMNS: dict[str, pa.DataType] = {
    "event_id": pa.string(),
    "produced_ms": pa.int64(),
}
EVENT_SCHEMA = pa.schema(
    [pa.field(n, t, nullable=False) for n, t in REQUIRED_COLUMNS.items()]
    + [pa.field(n, t, nullable=True) for n, t in OPTIONAL_COLUMNS.items()]
)
# Nullability is checked row by row (with reasons), so the normalised table stays permissive.
_LOOSE_SCHEMA = pa.schema([pa.field(f.name, f.type, nullable=True) for f in EVENT_SCHEMA])
#: How many reasons an error message quotes (all of them stay on the exception).
_QUOTED_REASONS = 5


@dataclass(frozen=True)
class EventRules:
    """What the store accepts.

    Attributes:
        behaviours: known behaviour names.
        open_vocabulary: accept unknown behaviour names (they are appended to the vocabulary).
        max_id_length: longest user_id / item_id / event_id / behaviour name, in characters.
        min_timestamp: earliest accepted event time (unix s).
        max_future_skew_s: latest accepted event time is the wall clock plus this (s).
    """

    behaviours: frozenset[str]
    open_vocabulary: bool
    max_id_length: int
    min_timestamp: float
    max_future_skew_s: float


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check_events`.

    Attributes:
        valid: bool [n], True for rows the store accepts.
        reasons: one entry per row: None for a valid row, else why it is refused.
    """

    valid: np.ndarray
    reasons: list[str | None]

    @property
    def ok(self) -> bool:
        """True when every row is valid."""
        return bool(self.valid.all())

    def invalid_rows(self) -> np.ndarray:
        """0-based positions of the refused rows, int64 [k]."""
        return np.flatnonzero(~self.valid).astype(np.int64)

    def raise_if_invalid(self) -> None:
        """Raise `InvalidEventError` naming the refused rows, if any."""
        rows = self.invalid_rows()
        if rows.size == 0:
            return
        reasons = [str(self.reasons[i]) for i in rows]
        quoted = "; ".join(f"row {r}: {reasons[k]}" for k, r in enumerate(rows[:_QUOTED_REASONS]))
        more = f" (and {rows.size - _QUOTED_REASONS} more)" if rows.size > _QUOTED_REASONS else ""
        raise InvalidEventError(
            f"{rows.size} invalid event(s), nothing written: {quoted}{more}",
            rows=rows,
            reasons=reasons,
        )


def normalize_events(events: pa.Table) -> pa.Table:
    """The batch with exactly the store's columns and types (`EVENT_SCHEMA`), one chunk each.

    Extra columns are dropped; absent optional columns are added as nulls; compatible types are
    cast (e.g. large_string, int64 partitions, integer timestamps).

    Raises:
        InvalidEventError: a required column is absent or a column cannot be cast.
    """
    if not isinstance(events, pa.Table):
        raise InvalidEventError(f"events must be a pyarrow.Table, not {type(events).__name__}")
    missing = [name for name in REQUIRED_COLUMNS if name not in events.column_names]
    if missing:
        raise InvalidEventError(
            f"events lack required column(s) {missing} (have {events.column_names})"
        )
    columns = []
    for field in EVENT_SCHEMA:
        if field.name in events.column_names:
            column = events.column(field.name)
            if column.type != field.type:
                try:
                    column = column.cast(field.type, safe=True)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise InvalidEventError(
                        f"column {field.name!r} of type {column.type} cannot be read as "
                        f"{field.type}: {exc}"
                    ) from exc
            column = column.combine_chunks() if column.num_chunks != 1 else column
        else:
            column = pa.chunked_array([pa.nulls(events.num_rows, field.type)])
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=_LOOSE_SCHEMA)


def _np(column: pa.ChunkedArray | pa.Array, fill: object) -> np.ndarray:
    if column.null_count:
        column = column.fill_null(fill)
    return column.to_numpy(zero_copy_only=False)


def check_events(events: pa.Table, rules: EventRules, *, now: float) -> CheckResult:
    """Which rows of a normalised batch the store accepts, and why the others are refused.

    Checks: required values present; ids non-empty and at most `max_id_length` characters;
    behaviour known (unless the vocabulary is open); timestamp finite, >= `min_timestamp` and at
    most `now + max_future_skew_s`; partition and offset >= 0; offsets strictly increasing within
    each (topic, partition) of the batch (Kafka order).

    Args:
        events: output of `normalize_events`.
        rules: what is accepted.
        now: wall clock, unix s.
    """
    n = events.num_rows
    reasons: list[str | None] = [None] * n
    valid = np.ones(n, dtype=bool)

    def refuse(mask: np.ndarray, reason: str) -> None:
        if not mask.any():
            return
        for i in np.flatnonzero(mask & valid):
            reasons[i] = reason
        valid[mask] = False

    for name in REQUIRED_COLUMNS:
        column = events.column(name)
        if column.null_count:
            refuse(column.is_null().to_numpy(zero_copy_only=False), f"{name} is missing")

    names = ["user_id", "item_id", "event_id"] + (["behavior"] if rules.open_vocabulary else [])
    for name in names:
        column = events.column(name)
        # Bytes bound characters from above: count characters only when bytes exceed the limit.
        size = _np(pc.binary_length(column), -1)
        present = size >= 0
        refuse(present & (size == 0), f"{name} is empty")
        if (size > rules.max_id_length).any():
            chars = _np(pc.utf8_length(column), -1)
            refuse(chars > rules.max_id_length,
                   f"{name} is longer than {rules.max_id_length} characters")

    if not rules.open_vocabulary:
        behaviour = events.column("behavior")
        known = _np(pc.is_in(behaviour, value_set=pa.array(sorted(rules.behaviours), pa.string())),
                    True)
        for i in np.flatnonzero(~known & valid):
            reasons[i] = f"unknown behavior {behaviour[int(i)].as_py()!r}"
        valid[~known] = False

    ts = _np(events.column("timestamp"), 0.0).astype(np.float64)
    refuse(~np.isfinite(ts), "timestamp is not a finite number")
    latest = now + rules.max_future_skew_s
    with np.errstate(invalid="ignore"):
        refuse(np.isfinite(ts) & (ts < rules.min_timestamp),
               f"timestamp is before {rules.min_timestamp} (unix s)")
        refuse(np.isfinite(ts) & (ts > latest),
               f"timestamp is more than {rules.max_future_skew_s} s in the future "
               "(unix seconds expected, not milliseconds)")

    partition = _np(events.column("partition"), 0).astype(np.int64)
    offset = _np(events.column("offset"), 0).astype(np.int64)
    refuse(partition < 0, "partition is negative")
    refuse(offset < 0, "offset is negative")

    if n > 1:
        topic_codes = _np(pc.dictionary_encode(events.column("topic")).combine_chunks().indices, -1)
        key = (topic_codes.astype(np.int64) << 32) | (partition & 0xFFFFFFFF)
        order = np.lexsort((np.arange(n), key))
        same = key[order][1:] == key[order][:-1]
        not_increasing = same & (offset[order][1:] <= offset[order][:-1])
        bad = np.zeros(n, dtype=bool)
        bad[order[1:][not_increasing]] = True
        refuse(bad, "offset is not above the previous offset of its partition in this batch")
    return CheckResult(valid=valid, reasons=reasons)


def normalize_offsets(offsets: Mapping[tuple[str, int], int]) -> dict[tuple[str, int], int]:
    """`offsets` as a plain dict of ((topic, partition), next offset) with checked types.

    Raises:
        InvalidEventError: a key is not (non-empty str, int >= 0) or a value not an int >= 0.
    """
    if not isinstance(offsets, Mapping):
        raise InvalidEventError(f"offsets must be a mapping, not {type(offsets).__name__}")
    out: dict[tuple[str, int], int] = {}
    for key, value in offsets.items():
        if (
            not isinstance(key, tuple)
            or len(key) != 2
            or not isinstance(key[0], str)
            or not key[0]
            or not _is_int(key[1])
            or int(key[1]) < 0
        ):
            raise InvalidEventError(f"offsets key {key!r} is not (topic, partition >= 0)")
        if not _is_int(value) or int(value) < 0:
            raise InvalidEventError(f"offsets[{key!r}] = {value!r} is not an offset >= 0")
        out[(key[0], int(key[1]))] = int(value)
    return out


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, np.integer))


def behaviour_names_ok(names: Sequence[str], max_id_length: int) -> None:
    """Raise `ValueError` unless `names` is a non-empty list of unique, non-empty names."""
    if not names:
        raise ValueError("behaviours must name at least one behaviour")
    if len(set(names)) != len(names):
        raise ValueError(f"behaviour names must be unique: {list(names)}")
    for name in names:
        if not isinstance(name, str) or not name or len(name) > max_id_length:
            raise ValueError(f"behaviour name {name!r} is empty, not a string or too long")
