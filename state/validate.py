"""The batch checks `apply` makes itself: column types and presence (per column, not per row),
the offsets map, and Kafka order within a partition.

The rows' content (ids, lengths, timestamps, vocabulary of a closed set) is validated once, by
the stream leaf when it decodes a record (`stream/decode.py`); what fails there goes to the dead
letter topic and never reaches the store. The store trusts the decoded schema and keeps only its
own invariants (offsets, event-id duplicates, vocabulary limits: see `state.events`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
_LOOSE_SCHEMA = pa.schema([pa.field(f.name, f.type, nullable=True) for f in EVENT_SCHEMA])
#: How many offending rows an error message quotes (all of them stay on the exception).
QUOTED_ROWS = 5


def refuse_rows(rows: np.ndarray, reason: str) -> InvalidEventError:
    """`InvalidEventError` naming `rows` (0-based input positions, int64 [k]), one reason each."""
    rows = np.asarray(rows, dtype=np.int64)
    quoted = ", ".join(str(r) for r in rows[:QUOTED_ROWS].tolist())
    more = f" (and {rows.size - QUOTED_ROWS} more)" if rows.size > QUOTED_ROWS else ""
    return InvalidEventError(
        f"{rows.size} event(s) refused, nothing written: {reason} (rows {quoted}{more})",
        rows=rows, reasons=[reason] * rows.size,
    )


def normalize_events(events: pa.Table) -> pa.Table:
    """The batch with exactly the store's columns and types (`EVENT_SCHEMA`), one chunk each.

    Extra columns are dropped; absent optional columns are added as nulls; compatible types are
    cast (e.g. large_string, int64 partitions, integer timestamps). Cost: one check per column;
    the decoder's tables (`stream.decode.DECODED_SCHEMA`) need no cast.

    Raises:
        InvalidEventError: not a table, a required column absent or holding nulls, or a column
            that cannot be cast.
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
            if column.null_count and not field.nullable:
                rows = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
                raise refuse_rows(rows, f"{field.name} is missing")
            column = column.combine_chunks() if column.num_chunks != 1 else column
        else:
            column = pa.chunked_array([pa.nulls(events.num_rows, field.type)])
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=_LOOSE_SCHEMA)


def check_kafka_order(events: pa.Table) -> None:
    """Raise `InvalidEventError` unless offsets increase strictly within each
    (topic, partition) of the batch (Kafka order: what the stored next offset relies on)."""
    n = events.num_rows
    if n < 2:
        return
    topic_codes = pc.dictionary_encode(events.column("topic")).combine_chunks().indices
    partition = events.column("partition").to_numpy().astype(np.int64)
    offset = events.column("offset").to_numpy()
    key = (topic_codes.to_numpy(zero_copy_only=False).astype(np.int64) << 32) | (
        partition & 0xFFFFFFFF)
    order = np.lexsort((np.arange(n), key))
    same = key[order][1:] == key[order][:-1]
    not_increasing = same & (offset[order][1:] <= offset[order][:-1])
    if not_increasing.any():
        raise refuse_rows(np.sort(order[1:][not_increasing]),
                          "offset is not above the previous offset of its partition in this batch")


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
    """Raise `ValueError` unless `names` is a non-empty list of unique, non-empty names of at
    most `max_id_length` characters."""
    if not names:
        raise ValueError("behaviours must name at least one behaviour")
    if len(set(names)) != len(names):
        raise ValueError(f"behaviour names must be unique: {list(names)}")
    for name in names:
        if not isinstance(name, str) or not name or len(name) > max_id_length:
            raise ValueError(f"behaviour name {name!r} is empty, not a string or too long")
