"""Benchmark of the DuckDB state store (`state.StateStore`).

Measures, in one run on one machine:

* apply throughput (events/s) in batches of `--batch-size` events, sequence length
  `--sequence-length`, `--users` active users, on a DuckDB file, after `--warmup-batches`
  (enough for full sequences by default); the timed batches are split into `--rounds` rounds
  and the median round is reported (the folds of the snapshot tables fall inside the rounds);
* fetch latency of `--fetch-users` random users' padded sequences (p50 / p99 over
  `--fetch-repeats`), and of a training sample of the same size;
* two baselines on `--baseline-batches` of the same batches, after the same warm-up, for the
  ratio: "set-based SQL" keeps the sequences in DuckDB only, as LIST columns upserted per batch
  with one `INSERT ... SELECT ... GROUP BY user ... ON CONFLICT DO UPDATE` (plus the events
  appended), one transaction per batch; "executemany" does one such upsert per event.

Run: .venv/bin/python bench/bench_state.py   (see --help; --json FILE writes the results).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from consumers.training.sampling import sample_training_sequences
from state import StateStore, StoreConfig

BEHAVIOURS = ["pv", "cart", "fav", "buy"]
BEHAVIOUR_WEIGHTS = [0.85, 0.06, 0.05, 0.04]
TOPIC = "behaviours"
#: Share of a training sample taken from recently touched users (the old store default).
RECENT_FRACTION = 0.8
T0 = 1.7e9

Batch = tuple[pa.Table, dict[tuple[str, int], int]]


def make_batches(args: argparse.Namespace, count: int, start_batch: int,
                 offsets: np.ndarray) -> list[Batch]:
    """Kafka-like batches: users uniform over --users (keyed to partitions), items Zipf(1.2)
    over --items, behaviours 85/6/5/4 %, unique event ids, consecutive offsets per partition."""
    rng = np.random.default_rng(args.seed + start_batch)
    behaviours = np.array(BEHAVIOURS, dtype=object)
    batches = []
    for b in range(count):
        n = args.batch_size
        users = rng.integers(0, args.users, n)
        items = (rng.zipf(1.2, n) - 1) % args.items
        partition = (users % args.partitions).astype(np.int32)
        offset = np.empty(n, dtype=np.int64)
        for p in range(args.partitions):
            mask = partition == p
            offset[mask] = offsets[p] + np.arange(int(mask.sum()))
            offsets[p] += int(mask.sum())
        batch_no = start_batch + b
        table = pa.table({
            "user_id": pa.array([f"user-{u}" for u in users.tolist()], pa.string()),
            "item_id": pa.array([f"item-{i}" for i in items.tolist()], pa.string()),
            "behavior": pa.array(rng.choice(behaviours, n, p=BEHAVIOUR_WEIGHTS), pa.string()),
            "timestamp": T0 + batch_no + np.sort(rng.random(n)),
            "event_id": pa.array([f"ev-{batch_no}-{i}" for i in range(n)], pa.string()),
            "topic": pa.array([TOPIC] * n, pa.string()),
            "partition": partition,
            "offset": offset,
            "produced_ms": ((T0 + batch_no) * 1000 + np.arange(n)).astype(np.int64),
        })
        batches.append((table, {(TOPIC, p): int(offsets[p]) for p in range(args.partitions)}))
    return batches


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


def open_store(args: argparse.Namespace, path: Path, fsync_mode: str = "STANDARD") -> StateStore:
    return StateStore(path, behaviours=BEHAVIOURS, sequence_length=args.sequence_length,
                      threads=args.threads, fold_events=args.fold_events, fsync_mode=fsync_mode)


def timed_rounds(args: argparse.Namespace, store: StateStore, timed: list[Batch]
                 ) -> tuple[list[float], list[float], list[float]]:
    """(events/s per round, seconds per batch, seconds of the batches that folded)."""
    batch_times, fold_times, rounds = [], [], []
    per_round = max(1, len(timed) // args.rounds)
    for r in range(0, len(timed), per_round):
        chunk = timed[r: r + per_round]
        start = time.perf_counter()
        for table, offs in chunk:
            before = store.stats()["events_not_folded"] if args.track_folds else 0
            t = time.perf_counter()
            store.apply(table, offs)
            elapsed = time.perf_counter() - t
            batch_times.append(elapsed)
            if args.track_folds and store.stats()["events_not_folded"] < before:
                fold_times.append(elapsed)
        rounds.append(sum(t.num_rows for t, _ in chunk) / (time.perf_counter() - start))
    return rounds, batch_times, fold_times


def bench_store(args: argparse.Namespace, folder: Path, warm: list[Batch],
                timed: list[Batch], timed_no_fsync: list[Batch]) -> dict:
    path = folder / "store.duckdb"
    store = open_store(args, path)
    for table, offs in warm:
        store.apply(table, offs)
    store.fold()
    seqs = store.sequences([f"user-{u}" for u in range(args.users)])
    mean_length = float(seqs.lengths.mean())

    rounds, batch_times, fold_times = timed_rounds(args, store, timed)

    rng = np.random.default_rng(args.seed)
    known = [f"user-{u}" for u in range(args.users)]
    fetch_times = []
    for _ in range(args.fetch_repeats):
        asked = [known[i] for i in rng.choice(args.users, args.fetch_users, replace=False)]
        t = time.perf_counter()
        got = store.sequences(asked)
        fetch_times.append(time.perf_counter() - t)
    assert got.items.shape == (args.fetch_users, args.sequence_length)
    sample_times = []
    for k in range(args.fetch_repeats):
        t = time.perf_counter()
        sample_training_sequences(store, args.fetch_users, seed=k, recent_fraction=RECENT_FRACTION)
        sample_times.append(time.perf_counter() - t)

    check = store.sequences(known[:100])
    t = time.perf_counter()
    store.close()
    close_s = time.perf_counter() - t
    t = time.perf_counter()
    reopened = open_store(args, path)
    open_s = time.perf_counter() - t
    assert np.array_equal(reopened.sequences(known[:100]).items, check.items)
    reopened.close()
    no_fsync = []
    if timed_no_fsync:
        unsynced = open_store(args, path, fsync_mode="NONE")
        no_fsync, _, _ = timed_rounds(args, unsynced, timed_no_fsync)
        unsynced.close()
    stats_store = open_store(args, path)
    stats = stats_store.stats()
    stats_store.close()
    return {
        "apply_events_per_s": statistics.median(rounds),
        "apply_rounds_events_per_s": rounds,
        "apply_batch": percentiles(batch_times),
        "apply_fsync_none_events_per_s": statistics.median(no_fsync) if no_fsync else None,
        "apply_fsync_none_rounds_events_per_s": no_fsync,
        "fold_batches": len(fold_times),
        "fold_batch_ms_mean": float(np.mean(fold_times) * 1000) if fold_times else None,
        "fetch": percentiles(fetch_times),
        "sample_training_sequences": percentiles(sample_times),
        "mean_sequence_length_after_warmup": mean_length,
        "users": stats["users"],
        "items": stats["items"],
        "events": stats["events_held"],
        "close_s": close_s,
        "open_s": open_s,
        "file_mb": os.path.getsize(path) / 1e6,
    }


class SqlBaseline:
    """The rolling sequences kept in DuckDB only: users(user_id PRIMARY KEY, items INTEGER[],
    behaviours SMALLINT[], n_events) upserted with `list_concat(old, new)[-N:]`, events
    appended."""

    def __init__(self, path: Path, sequence_length: int, vocab: dict[str, int] | None = None):
        self.path = path
        self.con = duckdb.connect(str(path))
        self.n = sequence_length
        self.vocab: dict[str, int] = {} if vocab is None else dict(vocab)
        self.bidx = {b: k + 1 for k, b in enumerate(BEHAVIOURS)}
        self.con.execute("CREATE TABLE IF NOT EXISTS users (user_id VARCHAR PRIMARY KEY, "
                         "items INTEGER[], behaviours SMALLINT[], n_events BIGINT)")
        self.con.execute("CREATE TABLE IF NOT EXISTS events (pos BIGINT, user_id VARCHAR, "
                         'item_idx INTEGER, behaviour_idx SMALLINT, timestamp DOUBLE, '
                         'topic VARCHAR, "partition" INTEGER, "offset" BIGINT)')

    def _columns(self, table: pa.Table) -> pa.Table:
        items = [self.vocab.setdefault(i, len(self.vocab) + 1)
                 for i in table.column("item_id").to_pylist()]
        return pa.table({
            "pos": np.arange(table.num_rows),
            "user_id": table.column("user_id"),
            "item_idx": pa.array(items, pa.int32()),
            "behaviour_idx": pa.array([self.bidx[b] for b in table.column("behavior").to_pylist()],
                                      pa.int16()),
            "timestamp": table.column("timestamp"),
            "topic": table.column("topic"),
            "partition": table.column("partition"),
            "offset": table.column("offset"),
        })

    def apply_set_based(self, table: pa.Table) -> None:
        n = self.n
        self.con.register("_batch", self._columns(table))
        self.con.execute("BEGIN TRANSACTION")
        self.con.execute("INSERT INTO events SELECT * FROM _batch")
        self.con.execute(
            "INSERT INTO users SELECT user_id, list(item_idx ORDER BY pos), "
            "list(behaviour_idx ORDER BY pos), count(*) FROM _batch GROUP BY user_id "
            "ON CONFLICT (user_id) DO UPDATE SET "
            f"items = list_concat(users.items, excluded.items)[-{n}:], "
            f"behaviours = list_concat(users.behaviours, excluded.behaviours)[-{n}:], "
            "n_events = users.n_events + excluded.n_events"
        )
        self.con.execute("COMMIT")

    def apply_executemany(self, table: pa.Table) -> None:
        n = self.n
        cols = self._columns(table)
        rows = [[u, i, b] for u, i, b in zip(cols.column("user_id").to_pylist(),
                                             cols.column("item_idx").to_pylist(),
                                             cols.column("behaviour_idx").to_pylist(),
                                             strict=True)]
        self.con.execute("BEGIN TRANSACTION")
        self.con.executemany(
            "INSERT INTO users VALUES (?, [?], [?], 1) ON CONFLICT (user_id) DO UPDATE SET "
            f"items = list_concat(users.items, excluded.items)[-{n}:], "
            f"behaviours = list_concat(users.behaviours, excluded.behaviours)[-{n}:], "
            "n_events = users.n_events + 1",
            rows,
        )
        self.con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()


def bench_baselines(args: argparse.Namespace, folder: Path, warm: list[Batch],
                    sample: list[Batch]) -> dict[str, dict]:
    """Events/s of both baseline write patterns on `sample`, each on a copy of one warmed-up
    file."""
    warmed = SqlBaseline(folder / "baseline_warm.duckdb", args.sequence_length)
    for table, _ in warm:
        warmed.apply_set_based(table)
    vocab = warmed.vocab
    warmed.close()
    out = {}
    for pattern in ("set_based", "executemany"):
        path = folder / f"baseline_{pattern}.duckdb"
        shutil.copy(warmed.path, path)
        baseline = SqlBaseline(path, args.sequence_length, vocab)
        apply = getattr(baseline, f"apply_{pattern}")
        events = 0
        start = time.perf_counter()
        for table, _ in sample:
            apply(table)
            events += table.num_rows
        elapsed = time.perf_counter() - start
        baseline.close()
        out[pattern] = {"events": events, "events_per_s": events / elapsed}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000, help="active users")
    parser.add_argument("--items", type=int, default=100_000, help="item catalogue size")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1_000)
    parser.add_argument("--sequence-length", type=int, default=50)
    parser.add_argument("--warmup-batches", type=int, default=500,
                        help="untimed batches first (500 x 1,000 events fill N = 50 on average)")
    parser.add_argument("--batches", type=int, default=300, help="timed batches")
    parser.add_argument("--rounds", type=int, default=3, help="the timed batches' rounds")
    parser.add_argument("--fold-events", type=int, default=StoreConfig().fold_events,
                        help="events between folds of the snapshot tables (the store's default)")
    parser.add_argument("--fetch-users", type=int, default=512)
    parser.add_argument("--fetch-repeats", type=int, default=500)
    parser.add_argument("--baseline-batches", type=int, default=5,
                        help="timed batches of each baseline (after the same warm-up)")
    parser.add_argument("--threads", type=int, default=0, help="DuckDB threads (0: default)")
    parser.add_argument("--no-fsync-batches", type=int, default=300,
                        help="timed batches applied again with fsync_mode NONE (0: skip)")
    parser.add_argument("--track-folds", action="store_true",
                        help="time the batches that fold (adds a count query per batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the DuckDB files")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    load_before = os.getloadavg()
    offsets = np.zeros(args.partitions, dtype=np.int64)
    warm = make_batches(args, args.warmup_batches, 0, offsets)
    timed = make_batches(args, args.batches, args.warmup_batches, offsets)
    timed_no_fsync = make_batches(args, args.no_fsync_batches,
                                  args.warmup_batches + args.batches, offsets)
    folder = Path(tempfile.mkdtemp(prefix="bench_state_", dir=args.dir))
    try:
        store = bench_store(args, folder, warm, timed, timed_no_fsync)
        baselines = bench_baselines(args, folder, warm, timed[: args.baseline_batches])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()

    rows, set_sql = baselines["executemany"], baselines["set_based"]
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average "
                   f"{load_before[0]:.1f} before / {load_after[0]:.1f} after",
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "pyarrow": pa.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "store": store,
        "baseline_set_based_sql": set_sql,
        "baseline_executemany": rows,
    }
    rate = store["apply_events_per_s"]
    print(f"State store ({results['machine']}; Python {results['python']}, "
          f"duckdb {duckdb.__version__}, pyarrow {pa.__version__})")
    print(f"{args.users} users, {args.items} items, N = {args.sequence_length}, batches of "
          f"{args.batch_size}, {args.warmup_batches} warm-up + {args.batches} timed batches "
          f"(mean sequence length after warm-up {store['mean_sequence_length_after_warmup']:.1f})")
    print()
    print("| measure | result |")
    print("| --- | --- |")
    print(f"| apply, `StateStore` (median of {len(store['apply_rounds_events_per_s'])} rounds) | "
          f"**{rate:,.0f} events/s**; rounds "
          + ", ".join(f"{r:,.0f}" for r in store["apply_rounds_events_per_s"])
          + f"; batch p50 {store['apply_batch']['p50_ms']:.1f} ms, "
          f"p99 {store['apply_batch']['p99_ms']:.1f} ms |")
    if store["apply_fsync_none_events_per_s"]:
        print("| apply, `StateStore` with `fsync_mode='NONE'` (median of "
              f"{len(store['apply_fsync_none_rounds_events_per_s'])} rounds) | "
              f"{store['apply_fsync_none_events_per_s']:,.0f} events/s; rounds "
              + ", ".join(f"{r:,.0f}" for r in store["apply_fsync_none_rounds_events_per_s"])
              + " |")
    if store["fold_batches"]:
        print(f"| batches that fold ({store['fold_batches']}) | mean "
              f"{store['fold_batch_ms_mean']:.0f} ms |")
    print(f"| apply, baseline set-based SQL upsert of LIST columns | "
          f"{set_sql['events_per_s']:,.0f} events/s (store is {rate / set_sql['events_per_s']:.1f}x) |")
    print(f"| apply, baseline `executemany` row upserts | {rows['events_per_s']:,.0f} events/s "
          f"(store is {rate / rows['events_per_s']:.0f}x) |")
    print(f"| `sequences` of {args.fetch_users} users | p50 {store['fetch']['p50_ms']:.2f} ms, "
          f"p99 {store['fetch']['p99_ms']:.2f} ms |")
    print(f"| `sample_training_sequences({args.fetch_users})` | "
          f"p50 {store['sample_training_sequences']['p50_ms']:.2f} ms, "
          f"p99 {store['sample_training_sequences']['p99_ms']:.2f} ms |")
    print(f"| close (fold) / reopen (rebuild the mirror) | {store['close_s']:.2f} s / "
          f"{store['open_s']:.2f} s for {store['users']:,} users, {store['items']:,} items, "
          f"{store['events']:,} events; file {store['file_mb']:.0f} MB |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
