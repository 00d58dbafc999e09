"""The changelog of an ingest instance's state: what it applied, partition by partition.

Scale-out (README, "Scale-out") gives every `behaviours` partition p a changelog partition p of
the same number. Each applied batch writes, per input partition it read, records that carry the
batch's valid events of that partition and the input's next offset after the batch (a record may
carry no event: dead letters move the offset too). Replayed in order through the store's
`apply(events, offsets)`, a partition's changelog rebuilds exactly that partition's state: the
same events in the same order, with the same offsets, so the store's own exactly-once rules
(drop below the stored offset, drop a remembered event id) give the same sequences.

Record layout (one format, versioned by the header ``casm.changelog``):

* key: the source partition as text; partition: the source partition;
* headers: ``casm.changelog`` (format version), ``source.topic``, ``source.partition``,
  ``source.first_offset`` (the input offset the writer's state had reached before the record:
  the previous record's next offset), ``source.next_offset``;
* value: an Arrow IPC stream (zstd-compressed) of the events' columns ``user_id, item_id,
  behavior, timestamp, event_id, offset, produced_ms`` (topic and partition are the headers').

A record can be written twice (a retry after a lost acknowledgement, a fenced-out instance that
had not noticed yet); the reader drops every row at or below an offset it has seen, so a
duplicate never reaches the store twice. Within a partition records must be sent one after the
other (`rounds`): a retried record must not overtake the next one.

The records of a partition form a chain: each continues from a state the records before it
reached (``source.first_offset`` at most the reader's next offset). A record that starts past
the reader's state (`ChangelogGap`) means the reader's state is not the changelog's: a zombie
(an instance paused past its session timeout) committed its own record on top of a state that
lacked what the partition's new owner had written meanwhile, or the records were deleted by
retention. The ingest role then restores that partition from the changelog's start; the trainer
stops with the error.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from kafka import KafkaConsumer, TopicPartition

from stream.decode import DECODED_SCHEMA

FORMAT_VERSION = b"2"
FORMAT_HEADER = "casm.changelog"
#: Columns a record's value holds (the rest of `DECODED_SCHEMA` is in its headers).
VALUE_SCHEMA = pa.schema([f for f in DECODED_SCHEMA if f.name not in ("topic", "partition")])
#: zstd: the columns are repetitive ids; a record is written once and read at every restore.
COMPRESSION = "zstd"
#: Poll period of a restore read (ms): short, a current partition is known as such after one fetch.
RESTORE_POLL_MS = 50


class ChangelogError(ValueError):
    """A changelog record that this version cannot read (our own topic: never a dead letter)."""


class ChangelogGap(ChangelogError):
    """A record that does not continue the reader's state (see the module docstring)."""

    def __init__(self, record: Any, source: tuple[str, int], first: int, seen: int) -> None:
        """`record`: the kafka-python ConsumerRecord that does not continue the state."""
        self.source, self.first, self.seen = source, first, seen
        super().__init__(
            f"{record.topic}[{record.partition}]@{record.offset} continues {source[0]}[{source[1]}] from input "
            f"offset {first}, but the state read so far ends at {seen}: records between are missing (deleted "
            f"by retention, or a paused instance committed past a partition's new owner)"
        )


@dataclass(frozen=True)
class ChangelogRecord:
    """One record to produce: `value` to changelog partition `partition`, with `key` and `headers`."""

    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    events: int


def encode_batch(
    events: pa.Table, next_offsets: Mapping[tuple[str, int], int], first_offsets: Mapping[tuple[str, int], int],
    max_events: int,
) -> list[list[ChangelogRecord]]:
    """The changelog records of one applied batch, in rounds: round r holds the r-th record of
    every partition that has one (send a round, wait for its acknowledgements, then the next).

    Args:
        events: the batch's valid events (`DECODED_SCHEMA`), in arrival order.
        next_offsets: next input offset per (topic, partition) after the batch; every partition
            named gets at least one record, with or without events.
        first_offsets: the writer's next input offset per (topic, partition) before the batch
            (its store's; 0 where absent).
        max_events: events per record at most.
    """
    if max_events < 1:
        raise ValueError(f"max_events must be >= 1, got {max_events}")
    sources = {topic for topic, _ in next_offsets}
    if len(sources) > 1 or (events.num_rows and set(events.column("topic").unique().to_pylist()) - sources):
        raise ValueError(f"one input topic per changelog batch: offsets of {sorted(sources)}, events of "
                         f"{sorted(set(events.column('topic').unique().to_pylist()))}")
    partition_col = events.column("partition").to_numpy()
    value_columns = events.select(VALUE_SCHEMA.names)
    rounds: list[list[ChangelogRecord]] = []
    for (topic, partition), next_offset in sorted(next_offsets.items()):
        rows = np.flatnonzero(partition_col == partition)
        chunks = [rows[i:i + max_events] for i in range(0, rows.size, max_events)] or [rows]
        offsets = events.column("offset").to_numpy()
        record_first = int(first_offsets.get((topic, partition), 0))
        for r, chunk in enumerate(chunks):
            # A record's next offset: past its own rows, the batch's only for the last one (a
            # reader must not skip the rows of the records after it).
            record_next = int(next_offset) if r == len(chunks) - 1 else int(offsets[chunk[-1]]) + 1
            record = ChangelogRecord(
                partition=partition,
                key=str(partition).encode(),
                value=_ipc_bytes(value_columns.take(pa.array(chunk, type=pa.int64()))),
                headers=[
                    (FORMAT_HEADER, FORMAT_VERSION),
                    ("source.topic", topic.encode()),
                    ("source.partition", str(partition).encode()),
                    ("source.first_offset", str(record_first).encode()),
                    ("source.next_offset", str(record_next).encode()),
                ],
                events=int(chunk.size),
            )
            record_first = record_next
            if len(rounds) <= r:
                rounds.append([])
            rounds[r].append(record)
    return rounds


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression=COMPRESSION)
    with pa.ipc.new_stream(sink, VALUE_SCHEMA, options=options) as writer:
        writer.write_table(table.cast(VALUE_SCHEMA))
    return sink.getvalue()


@dataclass
class DecodedChangelog:
    """Changelog records decoded for `StateStore.apply`.

    Attributes:
        events: `DECODED_SCHEMA` rows not seen before, in changelog order.
        offsets: next offset per (topic, partition): the sources' (from the records' headers)
            and the changelog's own (record offset + 1).
        records: how many records were read.
    """

    events: pa.Table
    offsets: dict[tuple[str, int], int]
    records: int


class ChangelogDecoder:
    """Decodes changelog records, dropping every row at or below an offset already seen of its
    source partition (duplicate records) and refusing a record that does not continue what was
    seen (`ChangelogGap`); `seen` starts at the store's next offsets."""

    def __init__(self, stored: Mapping[tuple[str, int], int] | None = None) -> None:
        self._next: dict[tuple[str, int], int] = dict(stored or {})

    def decode(self, records: Sequence) -> DecodedChangelog:
        """`records`: kafka-python ConsumerRecords of the changelog, each partition's in offset order.

        Raises:
            ChangelogGap: a record starts past the state read so far (this decoder is spent:
                the state it was given is not a prefix of the changelog).
            ChangelogError: a record without the changelog headers, of another format version,
                or whose value is not the expected Arrow stream.
        """
        tables: list[pa.Table] = []
        offsets: dict[tuple[str, int], int] = {}
        for record in records:
            headers = dict(record.headers or [])
            if headers.get(FORMAT_HEADER) != FORMAT_VERSION:
                raise ChangelogError(
                    f"{record.topic}[{record.partition}]@{record.offset}: not a changelog record of format "
                    f"{FORMAT_VERSION.decode()} (headers {sorted(headers)})"
                )
            try:
                source = (headers["source.topic"].decode(), int(headers["source.partition"]))
                first = int(headers["source.first_offset"])
                next_offset = int(headers["source.next_offset"])
                with pa.ipc.open_stream(record.value) as reader:
                    table = reader.read_all()
            except (KeyError, ValueError, pa.ArrowInvalid) as exc:
                raise ChangelogError(f"{record.topic}[{record.partition}]@{record.offset}: {exc}") from exc
            seen = self._next.get(source, 0)
            if first > seen:
                raise ChangelogGap(record, source, first, seen)
            if table.num_rows:
                fresh = np.flatnonzero(table.column("offset").to_numpy() >= seen)
                if fresh.size < table.num_rows:
                    table = table.take(pa.array(fresh, type=pa.int64()))
                if table.num_rows:
                    seen = int(table.column("offset")[-1].as_py()) + 1
                    tables.append(_with_source(table, *source))
            self._next[source] = max(seen, next_offset)
            offsets[source] = self._next[source]
            offsets[(record.topic, record.partition)] = record.offset + 1
        events = pa.concat_tables(tables) if tables else DECODED_SCHEMA.empty_table()
        return DecodedChangelog(events, offsets, len(records))


def _with_source(table: pa.Table, topic: str, partition: int) -> pa.Table:
    n = table.num_rows
    columns = {name: table.column(name) for name in VALUE_SCHEMA.names}
    columns["topic"] = pa.array([topic] * n, pa.string())
    columns["partition"] = pa.array(np.full(n, partition, np.int32))
    return pa.table({f.name: columns[f.name] for f in DECODED_SCHEMA}, schema=DECODED_SCHEMA)


def read_partitions(
    consumer: KafkaConsumer, topic: str, starts: Mapping[int, int], timeout_s: float, max_records: int
) -> Iterator[tuple[int, list]]:
    """Every record of the changelog partitions `starts` (partition -> first offset) up to the
    high watermark each had when the read began: (partition, records) in polls of at most
    `max_records`, each partition's in offset order. `consumer` joins no group and is assigned
    only these partitions while reading (one read for all: a current partition costs nothing
    but the first fetch).

    Raises:
        TimeoutError: the ends were not reached within `timeout_s`.
    """
    partitions = {p: TopicPartition(topic, p) for p in starts}
    if not partitions:
        return
    consumer.assign(list(partitions.values()))
    for p, tp in partitions.items():
        consumer.seek(tp, starts[p])
    deadline = time.monotonic() + timeout_s
    ends: dict[int, int] = {}
    left = set(partitions)
    while left:
        polled = consumer.poll(timeout_ms=RESTORE_POLL_MS, max_records=max_records)
        for p in list(left):
            tp = partitions[p]
            if p not in ends and (high := consumer.highwater(tp)) is not None:
                ends[p] = high  # known after the partition's first fetch response
            if records := polled.get(tp):
                yield p, records
            if p in ends and consumer.position(tp) >= ends[p]:
                left.discard(p)
        if left and time.monotonic() > deadline:
            raise TimeoutError(
                f"changelog {topic} partitions {sorted(left)} not read to their ends ({ends}) within {timeout_s} s"
            )
