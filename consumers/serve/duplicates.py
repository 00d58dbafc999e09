"""Conflicting duplicates: an event whose `event_id` was applied before (or comes earlier in the
same batch) but whose content differs. The state store would drop it as a producer retry, which
hides a producer bug or an id reused for another event; instead it goes to the dead-letter topic
with the kind ``conflicting_duplicate`` and both versions' content hashes, and the first version
stays applied. Exact duplicates (same id, same content) are left to the store, which drops and
counts them.

Content is (user_id, item_id, behavior, timestamp); its hash is the SHA-256 of those fields joined
by a unit separator. Only ids that the store's id memory holds or that repeat within the batch are
looked at (rare), so the cost of an ordinary batch is one in-memory lookup per event with an id.
An id whose applied event retention has trimmed can no longer be compared: it is dropped as an
exact duplicate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from state.store import StateStore
from stream.decode import EventValidator, RecordLike
from stream.models import DeadLetter

FIELD_SEPARATOR = "\x1f"


def content_hash(user_id: str, item_id: str, behavior: str, timestamp: float) -> str:
    """Hex SHA-256 of an event's content (what a duplicate must repeat exactly)."""
    text = FIELD_SEPARATOR.join((user_id, item_id, behavior, repr(float(timestamp))))
    return hashlib.sha256(text.encode()).hexdigest()


def split_conflicts(
    events: pa.Table,
    store: StateStore,
    stored_offsets: Mapping[int, int],
    records: Sequence[RecordLike],
    validator: EventValidator,
) -> tuple[pa.Table, list[DeadLetter]]:
    """`events` (decoded, of one topic) without its conflicting duplicates, and a dead letter for
    each of those. `stored_offsets`: the store's next offset per partition (rows below it are
    redeliveries, never conflicts); `records`: the polled records the rows came from."""
    n = events.num_rows
    if n == 0:
        return events, []
    ids = events.column("event_id").to_pylist()
    partitions = events.column("partition").to_numpy()
    offsets = events.column("offset").to_numpy()
    rows = [r for r in range(n) if ids[r] is not None and offsets[r] >= stored_offsets.get(int(partitions[r]), 0)]
    if not rows:
        return events, []
    known = store.known_event_ids([ids[r] for r in rows])
    counts: dict[str, int] = {}
    for r in rows:
        counts[ids[r]] = counts.get(ids[r], 0) + 1
    suspects = [r for r, k in zip(rows, known.tolist(), strict=True) if k or counts[ids[r]] > 1]
    if not suspects:
        return events, []
    applied = store.applied_events_by_id(sorted({ids[r] for r in suspects}))
    columns = {name: events.column(name).to_pylist() for name in ("user_id", "item_id", "behavior", "timestamp")}
    reference = {i: content_hash(*c) for i, c in applied.items()}
    by_position = {(rec.partition, rec.offset): rec for rec in records}
    conflicts: list[DeadLetter] = []
    drop = np.zeros(n, dtype=bool)
    for r in suspects:
        mine = content_hash(columns["user_id"][r], columns["item_id"][r], columns["behavior"][r],
                            columns["timestamp"][r])
        first = reference.setdefault(ids[r], mine)  # the batch's first version if none was applied
        if first == mine:
            continue
        drop[r] = True
        where = "applied before" if ids[r] in applied else "earlier in this batch"
        conflicts.append(validator.dead_letter(
            by_position[(int(partitions[r]), int(offsets[r]))], "conflicting_duplicate",
            f"event_id {ids[r]!r} was {where} with different content: applied version sha256 {first}, "
            f"this version sha256 {mine} (content: user_id, item_id, behavior, timestamp); the applied "
            "version stays",
        ))
    if not conflicts:
        return events, []
    return events.filter(pa.array(~drop)), conflicts
