"""The applying stage's batches: several polls merged into one, in poll order."""

from __future__ import annotations

from collections import namedtuple

from consumers.serve.apply_stage import DecodedBatch
from stream.decode import EventValidator, decode_behaviours

Record = namedtuple("Record", "topic partition offset timestamp key value")


def polled(partition: int, offsets: range, generation: int = 0) -> DecodedBatch:
    records = [Record("behaviours", partition, o, 1_700_000_000_000, b"u",
                      b'{"user_id":"u%d","item_id":"i","behavior":"pv","timestamp":1.7e9}' % o) for o in offsets]
    records.append(Record("behaviours", partition, offsets.stop, 1_700_000_000_000, b"u", b"not json"))
    events, dead = decode_behaviours(records, EventValidator())
    return DecodedBatch(records, events, dead, {("behaviours", partition): offsets.stop + 1}, generation)


def test_merged_polls_keep_poll_order_and_the_newest_offsets() -> None:
    first, second, third = polled(0, range(0, 3)), polled(1, range(10, 12)), polled(0, range(4, 6), generation=1)
    merged = DecodedBatch.merged([first, second, third])
    assert merged.events.column("offset").to_pylist() == [0, 1, 2, 10, 11, 4, 5]
    assert merged.events.column("partition").to_pylist() == [0, 0, 0, 1, 1, 0, 0]
    assert [(r.partition, r.offset) for r in merged.records] == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 10), (1, 11), (1, 12), (0, 4), (0, 5), (0, 6)]
    assert [letter.offset for letter in merged.dead] == [3, 12, 6]
    assert merged.offsets == {("behaviours", 0): 7, ("behaviours", 1): 13}
    assert merged.generation == 1
    assert DecodedBatch.merged([first]) is first
