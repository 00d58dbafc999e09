"""Conflicting duplicates are told from exact ones (same event_id, other content)."""

from __future__ import annotations

import pyarrow as pa

from consumers.serve.duplicates import content_hash, split_conflicts
from consumers.serve.service import open_store
from consumers.settings import CasmSettings
from stream.decode import DECODED_SCHEMA, EventValidator
from tests.stream.test_decode import Record  # one fake ConsumerRecord for the decoding tests


def table(rows: list[tuple[str, str, int]], start: int = 0) -> pa.Table:
    """(event_id, item, offset) rows of user u on partition 0."""
    return pa.Table.from_pylist([
        {"user_id": "u", "item_id": item, "behavior": "pv", "timestamp": 1.7e9, "event_id": eid,
         "topic": "behaviours", "partition": 0, "offset": offset, "produced_ms": 0}
        for eid, item, offset in rows], schema=DECODED_SCHEMA)


def test_conflicts_with_applied_and_earlier_rows_are_split_off() -> None:
    settings = CasmSettings(store={"path": ":memory:", "sequence_length": 5}, model={"max_len": 4}, progress=False)
    store = open_store(settings)
    store.apply(table([("a", "x", 0)]), {("behaviours", 0): 1})
    batch = table([("a", "x", 1), ("a", "y", 2), ("b", "p", 3), ("b", "q", 4), ("c", "z", 5)])
    records = [Record("behaviours", 0, o, 0, b"u", b"{}") for o in range(1, 6)]
    kept, dead = split_conflicts(batch, store, store.offsets("behaviours"), records, EventValidator())
    assert kept.column("offset").to_pylist() == [1, 3, 5]  # the exact repeat stays (the store drops it)
    assert [(d.offset, d.kind) for d in dead] == [(2, "conflicting_duplicate"), (4, "conflicting_duplicate")]
    assert content_hash("u", "x", "pv", 1.7e9) in dead[0].reason and "applied before" in dead[0].reason
    assert "earlier in this batch" in dead[1].reason
    store.close()


def test_redeliveries_below_the_stored_offset_are_never_conflicts() -> None:
    settings = CasmSettings(store={"path": ":memory:", "sequence_length": 5}, model={"max_len": 4}, progress=False)
    store = open_store(settings)
    store.apply(table([("a", "x", 0)]), {("behaviours", 0): 1})
    kept, dead = split_conflicts(table([("a", "x", 0)]), store, store.offsets("behaviours"),
                                 [Record("behaviours", 0, 0, 0, b"u", b"{}")], EventValidator())
    assert kept.num_rows == 1 and dead == []
    store.close()
