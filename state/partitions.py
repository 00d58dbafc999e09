"""Moving one Kafka partition's state between stores (the groundwork of scale-out).

`export_partition` reads everything a store holds for one (topic, partition) into plain Arrow
tables keyed by *external* ids (item ids, behaviour names, user ids), so they can be imported
into a store whose vocabularies number things differently. `import_partition` and
`drop_partition` run inside the caller's transaction. Exported tables:

    meta        one row: topic, partition, next_offset (null if none recorded), sequence_length,
                schema_version.
    items       item_id of every item the other tables mention, in the source's index order
                (importing into an empty store reproduces the numbering).
    users       user_id, items list<string>, behaviours list<string> (oldest first), n_events,
                first_seq, last_seq, last_timestamp, last_offset, last_produced_ms.
    events      the partition's held events in arrival order: seq, offset, user_id, item_id,
                behavior, timestamp, event_id, event_hash, produced_ms, applied_at.
    event_ids   remembered ids of trimmed events: event_hash, event_id, offset, applied_at.
    popularity  item_id, behavior, count.
    published   user_id, model_version, items list<string>, published_at, event_offset.

`seq` values only order things within the export; an import renumbers them after its own.
"""

from __future__ import annotations

from collections.abc import Mapping

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from state.errors import PartitionError
from state.schema import SCHEMA_VERSION

TABLES = ("meta", "items", "users", "events", "event_ids", "popularity", "published")
_WHERE = 'WHERE topic = $1 AND "partition" = $2'


def _fetch(con: duckdb.DuckDBPyConnection, sql: str, params: list) -> pa.Table:
    return con.sql(sql, params=params or None).to_arrow_table()


def _names(values: pa.Array | pa.ChunkedArray, vocab: pa.Array) -> pa.Array:
    """Map 1-based indices to names (vocab[i - 1])."""
    idx = pc.subtract(values.cast(pa.int64()), 1)
    return vocab.take(idx)


def _list_names(lists: pa.ChunkedArray, vocab: pa.Array, value_type: pa.DataType) -> pa.Array:
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    offsets = pc.subtract(arr.offsets, arr.offsets[0])
    flat = pc.list_flatten(arr)
    return pa.ListArray.from_arrays(offsets, _names(flat, vocab).cast(value_type))


def export_partition(
    con: duckdb.DuckDBPyConnection,
    topic: str,
    partition: int,
    next_offset: int | None,
    sequence_length: int,
    id_cutoff: float,
) -> dict[str, pa.Table]:
    """The partition's state as portable tables (see the module docstring).

    Args:
        con: connection to a store whose snapshots are folded up to its last event.
        topic, partition: the partition.
        next_offset: its stored next offset (None if none).
        sequence_length: N of the exporting store.
        id_cutoff: remembered ids applied before this (unix s) are left out.
    """
    params = [topic, partition]
    items_vocab = _fetch(con, "SELECT item_id FROM items ORDER BY idx", []).column(0).combine_chunks()
    behaviours_vocab = _fetch(con, "SELECT name FROM behaviours ORDER BY idx", []).column(0)
    behaviours_vocab = behaviours_vocab.combine_chunks()

    users = _fetch(
        con,
        "SELECT user_id, items, behaviours, n_events, first_seq, last_seq, last_timestamp, "
        f"last_offset, last_produced_ms FROM users {_WHERE} ORDER BY last_seq",
        params,
    )
    events = _fetch(
        con,
        'SELECT seq, "offset", user_id, item_idx, behaviour_idx, timestamp, event_id, '
        f"event_hash, produced_ms, applied_at FROM events {_WHERE} ORDER BY seq",
        params,
    )
    event_ids = _fetch(
        con,
        f'SELECT event_hash, event_id, "offset", applied_at FROM event_ids {_WHERE} '
        "AND applied_at >= $3 ORDER BY applied_at",
        [*params, id_cutoff],
    )
    popularity = _fetch(
        con,
        "SELECT item_idx, behaviour_idx, sum(count)::BIGINT AS count FROM popularity "
        f"{_WHERE} GROUP BY ALL ORDER BY item_idx, behaviour_idx",
        params,
    )
    published = _fetch(
        con,
        "SELECT user_id, model_version, items, published_at, event_offset FROM published "
        f"{_WHERE} ORDER BY user_id",
        params,
    )

    used = [
        pc.list_flatten(users.column("items")).to_numpy(),
        events.column("item_idx").to_numpy(),
        popularity.column("item_idx").to_numpy(),
    ]
    used_idx = np.unique(np.concatenate([u.astype(np.int64) for u in used]))
    return {
        "meta": pa.table({
            "topic": pa.array([topic], pa.string()),
            "partition": pa.array([partition], pa.int32()),
            "next_offset": pa.array([next_offset], pa.int64()),
            "sequence_length": pa.array([sequence_length], pa.int32()),
            "schema_version": pa.array([SCHEMA_VERSION], pa.int32()),
        }),
        "items": pa.table({"item_id": items_vocab.take(pa.array(used_idx - 1, pa.int64()))}),
        "users": pa.table({
            "user_id": users.column("user_id"),
            "items": _list_names(users.column("items"), items_vocab, pa.string()),
            "behaviours": _list_names(users.column("behaviours"), behaviours_vocab, pa.string()),
            **{name: users.column(name) for name in (
                "n_events", "first_seq", "last_seq", "last_timestamp", "last_offset",
                "last_produced_ms")},
        }),
        "events": pa.table({
            "seq": events.column("seq"),
            "offset": events.column("offset"),
            "user_id": events.column("user_id"),
            "item_id": _names(events.column("item_idx"), items_vocab),
            "behavior": _names(events.column("behaviour_idx"), behaviours_vocab),
            **{name: events.column(name) for name in (
                "timestamp", "event_id", "event_hash", "produced_ms", "applied_at")},
        }),
        "event_ids": event_ids,
        "popularity": pa.table({
            "item_id": _names(popularity.column("item_idx"), items_vocab),
            "behavior": _names(popularity.column("behaviour_idx"), behaviours_vocab),
            "count": popularity.column("count"),
        }),
        "published": published,
    }


def drop_partition(con: duckdb.DuckDBPyConnection, topic: str, partition: int) -> int:
    """Delete the partition's rows from every table (inside the caller's transaction).
    Returns users deleted."""
    params = [topic, partition]
    users = con.execute(f"DELETE FROM users {_WHERE}", params).fetchall()[0][0]
    for table in ("events", "commits", "popularity", "event_ids", "published"):
        con.execute(f"DELETE FROM {table} {_WHERE}", params)
    return int(users)


def import_partition(
    con: duckdb.DuckDBPyConnection,
    tables: Mapping[str, pa.Table],
    *,
    replace: bool,
    open_vocabulary: bool,
    now: float,
) -> int:
    """Insert an exported partition (inside the caller's transaction; the caller's snapshots
    must be folded up to its last event). Returns users imported.

    Raises:
        PartitionError: tables missing, the partition held here (and not `replace`), a user held
            here on another partition, or a behaviour unknown here with a closed vocabulary.
    """
    missing = [name for name in TABLES if name not in tables]
    if missing:
        raise PartitionError(f"export lacks table(s) {missing}")
    meta = tables["meta"].to_pylist()[0]
    topic, partition, next_offset = meta["topic"], int(meta["partition"]), meta["next_offset"]
    params = [topic, partition]
    if replace:
        drop_partition(con, topic, partition)
    elif con.execute(
        f"SELECT (SELECT count(*) FROM commits {_WHERE}) + (SELECT count(*) FROM users {_WHERE})",
        params,
    ).fetchall()[0][0]:
        raise PartitionError(
            f"the store holds state of {topic}[{partition}] already; import with replace=True"
        )
    users = tables["users"]
    con.register("_import_users", users.select(["user_id"]))
    try:
        clash = con.execute(
            'SELECT user_id, topic, "partition" FROM users '
            "WHERE user_id IN (SELECT user_id FROM _import_users) LIMIT 1"
        ).fetchall()
    finally:
        con.unregister("_import_users")
    if clash:
        user, held_topic, held_partition = clash[0]
        raise PartitionError(
            f"user {user!r} of the export is held here on {held_topic}[{held_partition}]"
        )

    # Vocabularies: append what is new, in the export's order.
    behaviours = [r[0] for r in con.execute("SELECT name FROM behaviours ORDER BY idx").fetchall()]
    wanted = list(dict.fromkeys(
        pc.list_flatten(users.column("behaviours")).to_pylist()
        + tables["events"].column("behavior").to_pylist()
        + tables["popularity"].column("behavior").to_pylist()
    ))
    new_behaviours = [b for b in wanted if b not in behaviours]
    if new_behaviours and not open_vocabulary:
        raise PartitionError(
            f"export uses behaviours {new_behaviours} unknown here (closed vocabulary)"
        )
    for name in new_behaviours:
        behaviours.append(name)
        con.execute("INSERT INTO behaviours VALUES ($1, $2)", [len(behaviours), name])
    behaviour_index = {name: k + 1 for k, name in enumerate(behaviours)}

    item_index = dict(con.execute("SELECT item_id, idx FROM items").fetchall())
    new_items = [i for i in dict.fromkeys(tables["items"].column("item_id").to_pylist())
                 if i not in item_index]
    base = len(item_index)
    item_index.update({item: base + k + 1 for k, item in enumerate(new_items)})
    _insert(con, "items", pa.table({
        "idx": pa.array(range(base + 1, base + 1 + len(new_items)), pa.int32()),
        "item_id": pa.array(new_items, pa.string()),
    }))

    def items_of(values: list[str]) -> np.ndarray:
        return np.fromiter((item_index[v] for v in values), dtype=np.int64, count=len(values))

    def behaviours_of(values: list[str]) -> np.ndarray:
        return np.fromiter((behaviour_index[v] for v in values), dtype=np.int64,
                           count=len(values))

    # Renumber arrival order after this store's last event, keeping the export's order.
    last_seq = int(con.execute(
        "SELECT greatest((SELECT coalesce(max(seq), 0) FROM events), "
        "(SELECT folded_seq FROM counters))"
    ).fetchall()[0][0])
    batch_seq = int(con.execute(
        "SELECT greatest((SELECT coalesce(max(batch_seq), 0) FROM commits), "
        "(SELECT batch_seq FROM counters))"
    ).fetchall()[0][0]) + 1
    events = tables["events"]
    old = np.unique(np.concatenate([
        events.column("seq").to_numpy(), users.column("first_seq").to_numpy(),
        users.column("last_seq").to_numpy(),
    ]).astype(np.int64))

    def renumber(values: pa.ChunkedArray) -> np.ndarray:
        return last_seq + 1 + np.searchsorted(old, values.to_numpy().astype(np.int64))

    new_last = last_seq + int(old.size)

    user_items = users.column("items").combine_chunks()
    user_behaviours = users.column("behaviours").combine_chunks()
    offsets = pc.subtract(user_items.offsets, user_items.offsets[0])
    _insert(con, "users", pa.table({
        "user_id": users.column("user_id"),
        "topic": pa.array([topic] * users.num_rows, pa.string()),
        "partition": pa.array([partition] * users.num_rows, pa.int32()),
        "items": pa.ListArray.from_arrays(
            offsets, pa.array(items_of(pc.list_flatten(user_items).to_pylist()), pa.int32())),
        "behaviours": pa.ListArray.from_arrays(
            offsets,
            pa.array(behaviours_of(pc.list_flatten(user_behaviours).to_pylist()), pa.int16())),
        "n_events": users.column("n_events"),
        "first_seq": renumber(users.column("first_seq")),
        "last_seq": renumber(users.column("last_seq")),
        "last_timestamp": users.column("last_timestamp"),
        "last_offset": users.column("last_offset"),
        "last_produced_ms": users.column("last_produced_ms"),
    }))
    n_events = events.num_rows
    _insert(con, "events", pa.table({
        "seq": renumber(events.column("seq")),
        "batch_seq": np.full(n_events, batch_seq, dtype=np.int64),
        "applied_at": events.column("applied_at"),
        "topic": pa.array([topic] * n_events, pa.string()),
        "partition": pa.array([partition] * n_events, pa.int32()),
        "offset": events.column("offset"),
        "user_id": events.column("user_id"),
        "item_idx": pa.array(items_of(events.column("item_id").to_pylist()), pa.int32()),
        "behaviour_idx": pa.array(behaviours_of(events.column("behavior").to_pylist()),
                                  pa.int16()),
        "timestamp": events.column("timestamp"),
        "event_id": events.column("event_id"),
        "event_hash": events.column("event_hash"),
        "produced_ms": events.column("produced_ms"),
    }))
    ids = tables["event_ids"]
    _insert(con, "event_ids", pa.table({
        "event_hash": ids.column("event_hash"),
        "event_id": ids.column("event_id"),
        "topic": pa.array([topic] * ids.num_rows, pa.string()),
        "partition": pa.array([partition] * ids.num_rows, pa.int32()),
        "offset": ids.column("offset"),
        "applied_at": ids.column("applied_at"),
    }))
    pop = tables["popularity"]
    _insert(con, "popularity", pa.table({
        "topic": pa.array([topic] * pop.num_rows, pa.string()),
        "partition": pa.array([partition] * pop.num_rows, pa.int32()),
        "item_idx": pa.array(items_of(pop.column("item_id").to_pylist()), pa.int32()),
        "behaviour_idx": pa.array(behaviours_of(pop.column("behavior").to_pylist()), pa.int16()),
        "count": pop.column("count"),
    }))
    published = tables["published"]
    _insert(con, "published", pa.table({
        "user_id": published.column("user_id"),
        "topic": pa.array([topic] * published.num_rows, pa.string()),
        "partition": pa.array([partition] * published.num_rows, pa.int32()),
        "model_version": published.column("model_version"),
        "items": published.column("items"),
        "published_at": published.column("published_at"),
        "event_offset": published.column("event_offset"),
    }))
    if next_offset is not None:
        con.execute(
            "INSERT INTO commits VALUES ($1, $2, $3, $4, $5, $6, 0)",
            [batch_seq, now, topic, partition, int(next_offset), n_events],
        )
    con.execute("UPDATE counters SET folded_seq = $1, batch_seq = $2", [new_last, batch_seq])
    return users.num_rows


def _insert(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    if data.num_rows == 0:
        return
    name = f"_import_{table}"
    columns = ", ".join(f'"{c}"' for c in data.column_names)
    con.register(name, data)
    try:
        con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {name}")
    finally:
        con.unregister(name)
