"""Changelog records: one partition's records rebuild exactly its events and offsets, duplicates
and all; a record that does not continue the reader's state is refused."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest

from stream.changelog import ChangelogDecoder, ChangelogError, ChangelogGap, encode_batch
from stream.decode import DECODED_SCHEMA


def _events(n: int, partitions: int = 2, topic: str = "b") -> pa.Table:
    part = np.arange(n) % partitions
    return pa.table({
        "user_id": [f"u{i % 5}" for i in range(n)], "item_id": [f"i{i}" for i in range(n)],
        "behavior": ["pv"] * n, "timestamp": np.arange(n, dtype=float), "event_id": [f"e{i}" for i in range(n)],
        "topic": [topic] * n, "partition": pa.array(part, pa.int32()),
        "offset": pa.array(np.arange(n) // partitions, pa.int64()), "produced_ms": pa.array([5] * n, pa.int64()),
    }, schema=DECODED_SCHEMA)


@dataclass
class _Record:
    topic: str
    partition: int
    offset: int
    headers: list
    value: bytes


def _as_consumed(rounds) -> list[_Record]:
    next_offset: dict[int, int] = {}
    out = []
    for records in rounds:
        for r in records:
            out.append(_Record("cl", r.partition, next_offset.get(r.partition, 0), r.headers, r.value))
            next_offset[r.partition] = next_offset.get(r.partition, 0) + 1
    return out


def test_round_trip_in_rounds_with_an_empty_partition() -> None:
    events = _events(20)
    rounds = encode_batch(events, {("b", 0): 10, ("b", 1): 12, ("b", 2): 4}, {}, max_events=4)
    assert [len(r) for r in rounds] == [3, 2, 2]  # 10 events of p0 and p1 each in 4+4+2; p2: one empty record
    assert sum(r.events for rs in rounds for r in rs) == 20
    decoded = ChangelogDecoder().decode(_as_consumed(rounds))
    key = lambda t: sorted(zip(t.column("partition").to_pylist(), t.column("offset").to_pylist(),  # noqa: E731
                               t.column("item_id").to_pylist(), strict=True))
    assert key(decoded.events) == key(events)
    assert decoded.offsets[("b", 0)] == 10 and decoded.offsets[("b", 1)] == 12 and decoded.offsets[("b", 2)] == 4
    assert decoded.offsets[("cl", 0)] == 3 and decoded.offsets[("cl", 2)] == 1
    assert decoded.events.schema == DECODED_SCHEMA


def test_duplicate_records_and_stored_offsets_are_dropped() -> None:
    rounds = encode_batch(_events(20), {("b", 0): 10, ("b", 1): 10}, {}, max_events=3)
    consumed = _as_consumed(rounds)
    decoder = ChangelogDecoder({("b", 1): 4})  # the store holds p1 below offset 4
    first = decoder.decode(consumed)
    again = decoder.decode(consumed)  # a zombie's copy of the same records
    assert first.events.num_rows == 10 + 6 and again.events.num_rows == 0
    p1 = [o for p, o in zip(first.events.column("partition").to_pylist(), first.events.column("offset").to_pylist(),
                            strict=True) if p == 1]
    assert p1 == list(range(4, 10))


def test_a_record_of_another_kind_is_refused() -> None:
    with pytest.raises(ChangelogError, match="not a changelog record"):
        ChangelogDecoder().decode([_Record("cl", 0, 0, [], b"{}")])
    rounds = encode_batch(_events(4), {("b", 0): 2, ("b", 1): 2}, {}, max_events=10)
    bad = _as_consumed(rounds)[0]
    bad.value = b"garbage"
    with pytest.raises(ChangelogError):
        ChangelogDecoder().decode([bad])


def test_events_of_two_topics_are_refused() -> None:
    with pytest.raises(ValueError, match="one input topic"):
        encode_batch(_events(4), {("b", 0): 2, ("x", 1): 2}, {}, max_events=10)


def _first_offsets(record) -> tuple[int, int]:
    headers = dict(record.headers)
    return int(headers["source.first_offset"]), int(headers["source.next_offset"])


def test_records_chain_from_the_writers_state() -> None:
    events = _events(20, partitions=1)  # offsets 0..19 of partition 0
    rounds = encode_batch(events.slice(8), {("b", 0): 21}, {("b", 0): 8}, max_events=5)
    assert [_first_offsets(r) for rs in rounds for r in rs] == [(8, 13), (13, 18), (18, 21)]


def test_a_record_past_the_readers_state_is_a_gap() -> None:
    events = _events(30, partitions=1)
    owner = encode_batch(events.slice(0, 10), {("b", 0): 10}, {}, max_events=100)
    successor = encode_batch(events.slice(10, 10), {("b", 0): 20}, {("b", 0): 10}, max_events=100)
    zombie = encode_batch(events.slice(10, 5), {("b", 0): 15}, {("b", 0): 10}, max_events=100)
    after = encode_batch(events.slice(20, 10), {("b", 0): 30}, {("b", 0): 20}, max_events=100)
    log = _as_consumed([*owner, *successor, *zombie, *after])
    # Read in order, the zombie's record repeats offsets the successor wrote: every event once.
    decoded = ChangelogDecoder().decode(log)
    assert decoded.events.column("offset").to_pylist() == list(range(30))
    # The zombie's own file (its record applied on top of the owner's) lacks 15..19: the record
    # after its own starts past its state.
    with pytest.raises(ChangelogGap, match="continues b\\[0\\] from input offset 20") as gap:
        ChangelogDecoder({("b", 0): 15}).decode(log[3:])
    assert (gap.value.source, gap.value.first, gap.value.seen) == (("b", 0), 20, 15)
    with pytest.raises(ChangelogGap):  # the changelog's start deleted by retention
        ChangelogDecoder().decode(log[1:])
