"""Scale-out measurements on the embedded broker (issue: scale-out).

    .venv/bin/python bench/bench_scale.py instances --events 300000
    .venv/bin/python bench/bench_scale.py restore --sizes 10000,50000,200000

- instances: the same log (pre-produced, 6 partitions) consumed by one `casm serve --role all`
  (no changelog), one `--role ingest` and two `--role ingest` in one group, one after the other,
  with refresh on and no trainer (lists by popularity: the ingest path alone). The aggregate rate
  is measured while every instance is consuming (from the first sample where all have applied
  events to the last before 95 % of the log is applied). Also the changelog's write
  amplification: bytes of changelog record values per byte of input record (key + value).
- restore: a changelog of one partition with N events, written as the ingest role writes it
  (batches of `--batch` events), restored into an empty store (`PartitionStates`); and the
  check of a store that is current already (nothing to read).

Prints a JSON result (and writes it to --json); BENCHMARKS.md quotes it with the command. Run
alone on an idle machine: the load average before and after is part of the result.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import pyarrow as pa
from bench_report import run_and_report  # (bench/ is on the path: these run as scripts)

from consumers.evaluation.live import ServeProcess
from consumers.serve.changelog_writer import ChangelogWriter
from consumers.serve.partition_state import PartitionStates
from consumers.serve.service import open_store
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from stream.broker import EmbeddedBroker, free_port
from stream.clients import make_producer, read_topic
from stream.config import BrokerConfig, SyntheticConfig
from stream.decode import DECODED_SCHEMA
from stream.delivery import acknowledged_producer
from stream.replay import parse_pacing, replay
from stream.synthetic import generate
from stream.testing import unique_topics
from stream.topics import ensure_topics

PARTITIONS = 6
SAMPLE_S = 0.5
MEASURED_SHARE = 0.95  # the rate is measured up to this share of the log (the tail is one instance's)


def base_settings(folder: Path, bootstrap: str, name: str, topics) -> CasmSettings:
    settings = CasmSettings(progress=False)
    settings.kafka.bootstrap_servers = bootstrap
    settings.topics = topics
    settings.store.path = folder / f"{name}.duckdb"
    settings.serve.checkpoint_dir = folder / f"{name}-checkpoints"
    settings.serve.metrics_port = free_port("127.0.0.1")
    settings.serve.recommender = "popularity"  # no trainer: the ingest path alone
    settings.drift.enabled = False
    settings.scale.instance_id = name
    return settings


def run_instances(folder: Path, bootstrap: str, topics, role: str, count: int, total: int) -> dict:
    """`count` instances of `role` in a fresh group and changelog; the aggregate rate."""
    run_topics = topics.model_copy(update={k: f"{getattr(topics, k)}-{role}{count}" for k in ("changelog", "models", "status")}
                                   | {"recommendations": f"{topics.recommendations}-{role}{count}"})
    ensure_topics(bootstrap, CasmSettings().kafka.model_copy(update={"bootstrap_servers": bootstrap}), run_topics)
    processes = []
    for k in range(count):
        settings = base_settings(folder, bootstrap, f"{role}{count}-{k}", run_topics)
        settings.kafka.group_id = f"bench-{role}{count}"
        settings.scale.role = role
        processes.append(ServeProcess(settings, folder / f"{role}{count}-{k}.log"))
    samples: list[tuple[float, list[float]]] = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        applied = [p.metrics().get("casm_events_applied_total", 0.0) for p in processes]
        samples.append((time.monotonic(), applied))
        if sum(applied) >= total:
            break
        time.sleep(SAMPLE_S)
    metrics = [p.metrics() for p in processes]
    for p in processes:
        p.stop(300)
    start = next(i for i, (_, a) in enumerate(samples) if all(x > 0 for x in a))
    end = max(i for i, (_, a) in enumerate(samples) if sum(a) < MEASURED_SHARE * total)
    (t0, a0), (t1, a1) = samples[start], samples[end]
    result = {
        "role": role, "instances": count, "events": total,
        "aggregate_events_per_s": round((sum(a1) - sum(a0)) / max(t1 - t0, 1e-9)),
        "measured_s": round(t1 - t0, 1),
        "events_per_instance": [int(x) for x in samples[-1][1]],
    }
    if role == "ingest":
        result["changelog_value_bytes"] = int(sum(m.get("casm_changelog_bytes_total", 0.0) for m in metrics))
        result["changelog_records"] = int(sum(m.get("casm_changelog_records_total", 0.0) for m in metrics))
    return result


def bench_instances(args: argparse.Namespace) -> dict:
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        topics = unique_topics("bench", partitions=PARTITIONS)
        settings = base_settings(folder, broker.bootstrap, "producer", topics)
        ensure_topics(broker.bootstrap, settings.kafka, topics)
        events = generate(SyntheticConfig(n_events=args.events, n_users=20_000, seed=1)).events
        producer = make_producer(settings.kafka, broker.bootstrap)
        replay(events, producer, topics.behaviours, parse_pacing(None, None, True), progress=False)
        producer.close()
        input_bytes = sum(len(r.value) + len(r.key or b"")
                          for r in read_topic(settings.kafka, broker.bootstrap, topics.behaviours, timeout_s=300))
        runs = [run_instances(folder, broker.bootstrap, topics, role, count, args.events)
                for role, count in (("all", 1), ("ingest", 1), ("ingest", 2))]
    for run in runs:
        if "changelog_value_bytes" in run:
            run["write_amplification"] = round(run["changelog_value_bytes"] / input_bytes, 3)
    one, two = runs[1]["aggregate_events_per_s"], runs[2]["aggregate_events_per_s"]
    return {"events": args.events, "partitions": PARTITIONS, "input_record_bytes": input_bytes, "runs": runs,
            "two_over_one_ingest": round(two / one, 2),
            "ingest_over_all": round(one / runs[0]["aggregate_events_per_s"], 2)}


class _NoPublisher:
    """Restores touch users for a refresh; the benchmark has no publisher."""

    def touch(self, users, when) -> None: ...


def bench_restore(args: argparse.Namespace) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        for size in sizes:
            topics = unique_topics(f"restore{size}", partitions=1)
            settings = base_settings(folder, broker.bootstrap, f"source{size}", topics)
            settings.scale.changelog_max_events = args.batch
            ensure_topics(broker.bootstrap, settings.kafka, topics)
            events = generate(SyntheticConfig(n_events=size, n_users=max(100, size // 25), seed=2)).events
            n = events.num_rows
            decoded = _as_decoded(events, topics.behaviours)
            producer = acknowledged_producer(settings.kafka, broker.bootstrap, make_producer)
            writer = ChangelogWriter(settings, producer, ServiceMetrics(10.0))
            written_at = time.perf_counter()
            for start in range(0, n, args.batch):
                chunk = decoded.slice(start, args.batch)
                writer.write(chunk, {(topics.behaviours, 0): start + chunk.num_rows}, {0: start})
            write_s = time.perf_counter() - written_at
            producer.close(10)
            changelog_bytes = sum(len(r.value) for r in read_topic(settings.kafka, broker.bootstrap, topics.changelog,
                                                                     timeout_s=300))
            target = base_settings(folder, broker.bootstrap, f"target{size}", topics)
            with open_store(target) as store:
                states = PartitionStates(target, broker.bootstrap, store, _NoPublisher(), ServiceMetrics(10.0))
                started = time.perf_counter()
                restored = states._restore([0])[0][0]
                restore_s = time.perf_counter() - started
                started = time.perf_counter()
                again = states._restore([0])[0][0]  # current already: only the high watermark is read
                current_s = time.perf_counter() - started
                states.close()
                assert restored == n and again == 0, (restored, again, n)
                held = store.stats()["events_applied"]
            rows.append({"events": n, "changelog_records": -(-n // args.batch), "changelog_mb": round(changelog_bytes / 1e6, 2),
                         "write_s": round(write_s, 2), "restore_s": round(restore_s, 2),
                         "restore_events_per_s": round(n / restore_s), "current_check_s": round(current_s, 3),
                         "events_in_store": held})
    return {"batch_events": args.batch, "restores": rows}


def _as_decoded(events: pa.Table, topic: str) -> pa.Table:
    """A log's events as decoded `behaviours` records of partition 0 (offsets 0..n-1)."""
    n = events.num_rows
    return pa.table({
        "user_id": events.column("user_id"), "item_id": events.column("item_id"), "behavior": events.column("behavior"),
        "timestamp": events.column("timestamp"), "event_id": pa.array([f"e{k}" for k in range(n)], pa.string()),
        "topic": pa.array([topic] * n, pa.string()), "partition": pa.array(np.zeros(n, np.int32)),
        "offset": pa.array(np.arange(n, dtype=np.int64)), "produced_ms": pa.array(np.full(n, 1, np.int64)),
    }, schema=DECODED_SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["instances", "restore"])
    parser.add_argument("--events", type=int, default=300_000, help="instances: events of the log")
    parser.add_argument("--sizes", default="10000,50000,200000", help="restore: events per partition, comma-separated")
    parser.add_argument("--batch", type=int, default=2_000, help="restore: events per applied batch (changelog record)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    run_and_report(lambda: {"instances": bench_instances, "restore": bench_restore}[args.what](args), args.json)


if __name__ == "__main__":
    main()
