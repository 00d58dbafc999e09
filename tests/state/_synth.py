"""Event tables and a deterministic Kafka-like log for the state store's tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from state import StateStore

BEHAVIOURS = ["pv", "cart", "fav", "buy"]
TOPIC = "behaviours"
T0 = 1_700_000_000.0
#: The tests' wall clock: well after every synthetic event time.
NOW = T0 + 10_000_000.0


def clock() -> float:
    return NOW


def open_store(path: str | Path = ":memory:", **kwargs: Any) -> StateStore:
    """A store with the test behaviours, N = 5 and the fixed clock unless overridden."""
    options: dict[str, Any] = {"behaviours": BEHAVIOURS, "sequence_length": 5, "clock": clock}
    options.update(kwargs)
    return StateStore(path, **options)


def events(rows: Sequence[Mapping[str, Any]], *, topic: str = TOPIC) -> pa.Table:
    """An event table; each row needs user_id, item_id, offset; behavior defaults to 'pv',
    timestamp to T0 + offset, partition to 0, event_id and produced_ms to null."""
    def col(name: str, default: Callable[[Mapping[str, Any]], Any]) -> list[Any]:
        return [row.get(name, default(row)) for row in rows]

    return pa.table({
        "user_id": pa.array(col("user_id", lambda r: None), pa.string()),
        "item_id": pa.array(col("item_id", lambda r: None), pa.string()),
        "behavior": pa.array(col("behavior", lambda r: "pv"), pa.string()),
        "timestamp": pa.array(col("timestamp", lambda r: T0 + (r.get("offset") or 0)), pa.float64()),
        "event_id": pa.array(col("event_id", lambda r: None), pa.string()),
        "topic": pa.array(col("topic", lambda r: topic), pa.string()),
        "partition": pa.array(col("partition", lambda r: 0), pa.int32()),
        "offset": pa.array(col("offset", lambda r: None), pa.int64()),
        "produced_ms": pa.array(col("produced_ms", lambda r: None), pa.int64()),
    })


def simple(users: Sequence[str], items: Sequence[str], *, start: int = 0, partition: int = 0,
           behaviours: Sequence[str] | None = None, ids: bool = True) -> pa.Table:
    """Consecutive events on one partition from `start`, event ids 'p<partition>-<offset>'."""
    rows = []
    for k, (user, item) in enumerate(zip(users, items, strict=True)):
        offset = start + k
        rows.append({
            "user_id": user, "item_id": item, "offset": offset, "partition": partition,
            "behavior": behaviours[k] if behaviours else "pv",
            "event_id": f"p{partition}-{offset}" if ids else None,
            "produced_ms": int((T0 + offset) * 1000),
        })
    return events(rows)


def state_dump(store: StateStore) -> dict[str, Any]:
    """Everything observable about a store's event state, with external ids (comparable across
    stores whose vocabularies number things the same way or not)."""
    users = sorted(store.user_ids())
    seqs = store.sequences(users)
    item_ids = np.array(["<pad>", *store.item_ids()], dtype=object)
    names = np.array(["<pad>", *store.behaviour_names()], dtype=object)
    per_user = {}
    for k, user in enumerate(users):
        length = int(seqs.lengths[k])
        cols = slice(seqs.items.shape[1] - length, None)
        per_user[user] = (
            list(item_ids[seqs.items[k, cols]]), list(names[seqs.behaviours[k, cols]]),
            int(seqs.n_events[k]), seqs.last_topic[k], int(seqs.last_partition[k]),
            int(seqs.last_offset[k]), float(seqs.last_timestamp[k]),
            int(seqs.last_produced_ms[k]),
        )
    popularity = store.item_popularity()
    con = store.con
    events_held = con.execute(
        'SELECT topic, "partition", "offset", user_id, i.item_id, b.name, timestamp, event_id, '
        "produced_ms FROM events e JOIN items i ON i.idx = e.item_idx "
        "JOIN behaviours b ON b.idx = e.behaviour_idx ORDER BY seq"
    ).fetchall()
    return {
        "users": per_user,
        "items": store.item_ids(),
        "behaviours": store.behaviour_names(),
        "popularity": {store.item_ids()[i - 1]: int(popularity[i])
                       for i in range(1, len(popularity)) if popularity[i]},
        "offsets": store.all_offsets(),
        "events": events_held,
    }


@dataclass(frozen=True)
class Record:
    """One Kafka record of the synthetic log."""

    user_id: str
    item_id: str
    behavior: str
    timestamp: float
    event_id: str | None
    produced_ms: int
    dead_letter: bool  # went to the dead letter topic: advances the offset, no event
    retry_of: int | None  # offset of the record this one repeats (producer retry), if any


class SyntheticLog:
    """A deterministic multi-partition topic: users keyed to partitions, Zipf items, some
    producer retries (same event_id at a later offset), dead letters and events without ids.

    `poll(offsets)` returns the next batch a consumer positioned at `offsets` would apply: a
    deterministic function of `offsets` only, so a consumer that resumes from stored offsets
    after a crash rebuilds exactly the batches an uninterrupted consumer applied.
    """

    def __init__(self, *, seed: int, partitions: int = 3, per_partition: int = 2_000,
                 users: int = 300, items: int = 500, max_poll: int = 40,
                 retry_rate: float = 0.03, dead_letter_rate: float = 0.02,
                 no_id_rate: float = 0.1):
        rng = np.random.default_rng(seed)
        self.partitions = partitions
        self.max_poll = max_poll
        self.records: list[list[Record]] = []
        n = per_partition
        for p in range(partitions):
            part_users = np.arange(p, users, partitions)
            retry = rng.random(n) < retry_rate
            back = rng.integers(1, 6, n)
            user = rng.choice(part_users, n)
            item = (rng.zipf(1.3, n) - 1) % items
            behaviour = rng.choice(4, n, p=[0.7, 0.1, 0.1, 0.1])
            jitter = rng.random(n)
            no_id = rng.random(n) < no_id_rate
            dead = rng.random(n) < dead_letter_rate
            log: list[Record] = []
            for k in range(n):
                offset = len(log)
                if offset and retry[k]:
                    source = max(0, offset - int(back[k]))
                    original = log[source]
                    if original.event_id is not None and not original.dead_letter:
                        log.append(Record(**{**original.__dict__, "retry_of": source}))
                        continue
                log.append(Record(
                    user_id=f"u{int(user[k])}",
                    item_id=f"i{int(item[k])}",
                    behavior=BEHAVIOURS[int(behaviour[k])],
                    timestamp=T0 + offset + float(jitter[k]),
                    event_id=None if no_id[k] else f"e{p}-{offset}",
                    produced_ms=int((T0 + offset) * 1000),
                    dead_letter=bool(dead[k]),
                    retry_of=None,
                ))
            self.records.append(log)

    def end_offsets(self) -> dict[tuple[str, int], int]:
        return {(TOPIC, p): len(log) for p, log in enumerate(self.records)}

    def poll(self, offsets: Mapping[tuple[str, int], int]) -> tuple[pa.Table, dict] | None:
        """(events, next offsets) from `offsets`, or None once everything was read."""
        rows: list[dict[str, Any]] = []
        nxt: dict[tuple[str, int], int] = {}
        for p, log in enumerate(self.records):
            start = offsets.get((TOPIC, p), 0)
            if start >= len(log):
                continue
            take = 1 + (start * 7 + p * 13) % self.max_poll
            end = min(len(log), start + take)
            for offset in range(start, end):
                r = log[offset]
                if r.dead_letter:
                    continue
                rows.append({
                    "user_id": r.user_id, "item_id": r.item_id, "behavior": r.behavior,
                    "timestamp": r.timestamp, "event_id": r.event_id, "partition": p,
                    "offset": offset, "produced_ms": r.produced_ms,
                })
            nxt[(TOPIC, p)] = end
        if not nxt:
            return None
        return events(rows), nxt

    def expected_events(self, offsets: Mapping[tuple[str, int], int]) -> list[tuple[int, int]]:
        """(partition, offset) of the events a store at `offsets` must hold: every record
        below the offset that is neither a dead letter nor a retry of an applied id."""
        held = []
        for p, log in enumerate(self.records):
            for offset in range(min(offsets.get((TOPIC, p), 0), len(log))):
                r = log[offset]
                if not r.dead_letter and r.retry_of is None:
                    held.append((p, offset))
        return held

    def expected_sequences(self, length: int) -> dict[str, list[tuple[str, str]]]:
        """Per user, the last `length` (item, behaviour) of every applied event, in order."""
        out: dict[str, list[tuple[str, str]]] = {}
        for log in self.records:
            for r in log:
                if not r.dead_letter and r.retry_of is None:
                    out.setdefault(r.user_id, []).append((r.item_id, r.behavior))
        return {u: s[-length:] for u, s in out.items()}


def store_with_users(count: int, events_per_user: int = 2, **kwargs):
    """A store holding `count` users u0.. with `events_per_user` events each, applied in rounds
    (every user's k-th event in round k)."""
    store = open_store(**kwargs)
    offset = 0
    for k in range(events_per_user):
        users = [f"u{i}" for i in range(count)]
        store.apply(simple(users, [f"i{(i + k) % 7}" for i in range(count)], start=offset))
        offset += count
    return store
