"""Faults on the delivery path (issue 13): nothing lost, nothing doubled, every touched user served.

    .venv/bin/python bench/bench_faults.py restarts --events 100000 --restarts 4
    .venv/bin/python bench/bench_faults.py kills    --events 100000 --kills 5

- restarts: `casm serve` (``kafka.offset_out_of_range = reset-earliest``) runs against an embedded
  broker on a fixed port. The events are produced in ``restarts + 1`` chunks; after each chunk is
  applied the broker is stopped, while recommendations are still being published, and started again
  **empty** (the embedded broker keeps topics in memory): the service must find its stored offsets
  out of range, reset them (recorded in its store), rebuild its producer, read the new log from the
  start and re-send the lists that were never acknowledged. Before producing the next chunk the
  bench waits until the service has reset every partition (a recreated log that has already grown
  past the stored offset cannot be told from the old one: see consumers/serve/offset_guard.py).
- kills: one broker; the events are produced at ``--rate`` while the service is SIGKILLed
  ``--kills`` times at random moments and started again.

Every chunk also carries malformed messages (bad JSON, duplicate keys), exact retries of events
(same event_id and content) and conflicting duplicates (same event_id, other item). At the end the
bench checks the accounting, from the service's store file and the topics:

    produced = applied + dead letters + exact duplicates dropped
    applied events = distinct event ids applied (no event twice)
    every user with an applied event has an acknowledged list generated after its newest event

Prints a JSON result (and writes it to --json); BENCHMARKS.md quotes it with the command.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import duckdb
import numpy as np
import pyarrow as pa

from consumers.evaluation.live import ServeProcess
from consumers.settings import CasmSettings
from stream.broker import EmbeddedBroker, free_port
from stream.clients import make_producer, read_topic
from stream.config import BrokerConfig, SyntheticConfig
from stream.replay import parse_pacing, replay
from stream.synthetic import generate
from stream.topics import ensure_topics

MALFORMED_PER_CHUNK = 20
RETRIES_PER_CHUNK = 20
CONFLICTS_PER_CHUNK = 10
WAIT_S = 600.0
POLL_S = 0.25


def settings_for(folder: Path, port: int, run: str) -> CasmSettings:
    settings = CasmSettings(progress=False)
    settings.kafka.bootstrap_servers = f"127.0.0.1:{port}"
    settings.kafka.group_id = f"faults-{run}"  # a killed member would hold its partitions otherwise
    settings.kafka.session_timeout_ms = 6_000
    settings.kafka.heartbeat_interval_ms = 500
    settings.kafka.offset_out_of_range = "reset-earliest"
    settings.kafka.delivery_stall_s = 5.0
    settings.kafka.request_timeout_ms = 5_000
    settings.store.path = folder / "state.duckdb"
    settings.serve.checkpoint_dir = folder / "checkpoints"
    settings.serve.metrics_port = free_port("127.0.0.1")
    settings.serve.recommender = "popularity"  # the delivery path is under test, not the model
    settings.drift.enabled = False
    return settings


class Chunk:
    """One chunk of the stream plus its malformed messages, retries and conflicts."""

    def __init__(self, events: pa.Table, name: str, rng: random.Random) -> None:
        self.events = events
        self.name = name
        self.extra: list[tuple[bytes, bytes]] = []
        rows = events.to_pylist()
        for k in range(MALFORMED_PER_CHUNK):
            user = rows[rng.randrange(len(rows))]["user_id"]
            bad = b"{not json" if k % 2 else (
                b'{"user_id":"%s","item_id":"x","behavior":"pv","timestamp":1.7e9,"user_id":"y"}' % user.encode())
            self.extra.append((user.encode(), bad))
        self.retries = 0
        self.conflicts = 0
        for k in range(RETRIES_PER_CHUNK + CONFLICTS_PER_CHUNK):
            row = rng.randrange(len(rows))
            event = {**{f: rows[row][f] for f in ("user_id", "item_id", "behavior", "timestamp")},
                     "event_id": f"{name}:{row}"}
            if k >= RETRIES_PER_CHUNK:
                event["item_id"] = f"conflict-{k}"
                self.conflicts += 1
            else:
                self.retries += 1
            self.extra.append((event["user_id"].encode(), json.dumps(event).encode()))

    @property
    def produced(self) -> int:
        return self.events.num_rows + len(self.extra)

    def produce(self, settings: CasmSettings, rate: float | None = None) -> None:
        producer = make_producer(settings.kafka, settings.kafka.bootstrap_servers)
        try:
            pacing = parse_pacing(None, f"{rate:g}/s" if rate else None, rate is None)
            report = replay(self.events, producer, settings.topics.behaviours, pacing, source_name=self.name,
                            progress=False)
            assert report.sent == self.events.num_rows, report
            futures = [producer.send(settings.topics.behaviours, key=k, value=v) for k, v in self.extra]
            producer.flush()
            for future in futures:
                future.get(timeout=30)  # the retries come after their originals
        finally:
            producer.close()


def wait_for(what: str, condition, timeout_s: float = WAIT_S) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"not reached in {timeout_s} s: {what}")
        time.sleep(POLL_S)
    return time.monotonic() - started


def dead_letter_positions(settings: CasmSettings) -> tuple[int, set[tuple[int, int]], dict[str, int]]:
    """(records on the dead-letter topic, distinct (partition, offset) they stand for, kinds)."""
    records = read_topic(settings.kafka, settings.kafka.bootstrap_servers, settings.topics.dead_letters)
    letters = [json.loads(r.value) for r in records]
    kinds: dict[str, int] = {}
    for letter in letters:
        kinds[letter["kind"]] = kinds.get(letter["kind"], 0) + 1
    return len(records), {(d["partition"], d["offset"]) for d in letters}, kinds


def store_accounting(path: Path) -> dict:
    """Events applied, distinct ids, users, and users without a list generated after their newest event."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        applied, distinct = con.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
        users, unserved = con.execute(
            "WITH newest AS (SELECT user_id, max(applied_at) AS a FROM events GROUP BY 1), "
            "pub AS (SELECT user_id, max(published_at) AS p FROM published GROUP BY 1) "
            "SELECT count(*), count(*) FILTER (WHERE p IS NULL OR p < a) FROM newest LEFT JOIN pub USING (user_id)"
        ).fetchone()
        resets = con.execute("SELECT count(*) FROM offset_resets").fetchone()[0]
    finally:
        con.close()
    return {"applied": applied, "distinct_event_ids": distinct, "users": users, "users_unserved": unserved,
            "offset_resets": resets}


def chunks_of(events: pa.Table, n: int, seed: int) -> list[Chunk]:
    rng = random.Random(seed)
    bounds = np.linspace(0, events.num_rows, n + 1).astype(int)
    return [Chunk(events.slice(a, b - a), f"chunk{k}", rng) for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]


def check(result: dict, chunks: list[Chunk], dead_positions: int, store: dict, duplicates: int) -> dict:
    produced = sum(c.produced for c in chunks)
    valid = sum(c.events.num_rows for c in chunks)
    retries = sum(c.retries for c in chunks)
    result.update({
        "produced": produced,
        "applied": store["applied"],
        "dead_letters": dead_positions,
        "duplicates_dropped": duplicates,
        "distinct_event_ids": store["distinct_event_ids"],
        "users": store["users"],
        "users_unserved": store["users_unserved"],
        "offset_resets": store["offset_resets"],
    })
    result["ok"] = {
        "produced = applied + dead letters + duplicates": produced == store["applied"] + dead_positions + duplicates,
        "every valid event applied": store["applied"] == valid,
        "no event twice": store["applied"] == store["distinct_event_ids"],
        "exact retries dropped": duplicates == retries,
        "every touched user served": store["users_unserved"] == 0,
    }
    return result


def bench_restarts(args: argparse.Namespace) -> dict:
    stream = generate(SyntheticConfig(n_events=args.events, n_users=args.users, n_items=args.items, seed=args.seed))
    chunks = chunks_of(stream.events, args.restarts + 1, args.seed)
    port = free_port("127.0.0.1")
    with TemporaryDirectory(prefix="bench-faults-") as tmp:
        folder = Path(tmp)
        settings = settings_for(folder, port, "restarts")
        broker = EmbeddedBroker(BrokerConfig(port=port))
        broker.start()
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        service = ServeProcess(settings, folder / "serve.log")
        started = time.monotonic()
        dead_positions, dead_records, epochs = 0, 0, []
        try:
            service.wait_assigned(120)
            expected_applied = 0
            for k, chunk in enumerate(chunks):
                epoch: dict = {"chunk": k, "events": chunk.produced}
                if k:
                    epoch["reset_wait_s"] = round(wait_for(
                        "every partition reset", lambda k=k: service.metrics().get("casm_offset_resets_total", 0)
                        >= settings.topics.partitions * k), 1)
                t0 = time.monotonic()
                chunk.produce(settings)
                expected_applied += chunk.events.num_rows
                wait_for("chunk applied", lambda e=expected_applied: service.metrics().get(
                    "casm_events_applied_total", 0) >= e)
                epoch["apply_s"] = round(time.monotonic() - t0, 1)
                records, positions, kinds = dead_letter_positions(settings)
                wait_for("dead letters", lambda c=chunk: len(dead_letter_positions(settings)[1])
                         >= MALFORMED_PER_CHUNK + c.conflicts, 60)
                records, positions, kinds = dead_letter_positions(settings)
                dead_records += records
                dead_positions += len(positions)
                epoch.update(dead_letters=len(positions), kinds=kinds)
                metrics = service.metrics()
                epoch["published_acknowledged"] = metrics.get("casm_recommendations_published_total", 0)
                epochs.append(epoch)
                if k < len(chunks) - 1:
                    broker.stop()  # recommendations of this chunk are still being published
                    time.sleep(args.down_s)
                    broker = EmbeddedBroker(BrokerConfig(port=port))
                    broker.start()
                    ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
            wait_for("publisher idle and healthy", lambda: (service.health() or {}).get("status") == "ok"
                     and service.metrics().get("casm_recommendations_published_total", 0) > 0, 120)
            time.sleep(2 * settings.serve.published_record_every_s)
            metrics = service.metrics()
            final_users = set(chunks[-1].events.column("user_id").to_pylist())
            served = {r.key.decode() for r in read_topic(settings.kafka, settings.kafka.bootstrap_servers,
                                                         settings.topics.recommendations)}
            report = service.stop(60)
        finally:
            if service.process.poll() is None:
                service.process.kill()
            broker.stop()
        store = store_accounting(settings.store.path)
        result = {
            "bench": "restarts", "events": args.events, "restarts": args.restarts, "seconds": round(time.monotonic() - started, 1),
            "epochs": epochs, "dead_letter_records": dead_records,
            "producer_rebuilds": metrics.get("casm_producer_rebuilds_total", 0),
            "produce_failed": metrics.get("casm_produce_failed_total", 0),
            "last_chunk_users_served_on_new_broker": f"{len(final_users & served)}/{len(final_users)}",
            "report": {k: report.get(k) for k in ("events_applied", "duplicates", "dead_letters", "recommendations")},
        }
        result = check(result, chunks, dead_positions, store, int(report.get("duplicates", -1)))
        result["ok"]["last chunk's users served on the new broker"] = final_users <= served
        return result


def bench_kills(args: argparse.Namespace) -> dict:
    stream = generate(SyntheticConfig(n_events=args.events, n_users=args.users, n_items=args.items, seed=args.seed))
    chunks = chunks_of(stream.events, 1, args.seed)
    rng = random.Random(args.seed)
    with TemporaryDirectory(prefix="bench-kills-") as tmp:
        folder = Path(tmp)
        with EmbeddedBroker(BrokerConfig()) as broker:
            port = int(broker.bootstrap.rpartition(":")[2])
            settings = settings_for(folder, port, "kill0")
            ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
            producing = threading.Thread(target=chunks[0].produce, args=(settings, args.rate), daemon=True)
            started = time.monotonic()
            producing.start()
            kills, applied_at_kill = 0, []
            for run in range(args.kills + 1):
                settings = settings_for(folder, port, f"kill{run}")
                service = ServeProcess(settings, folder / f"serve{run}.log")
                service.wait_assigned(120)
                if run < args.kills:
                    time.sleep(rng.uniform(1.0, args.kill_every_s))
                    applied_at_kill.append(service.metrics().get("casm_events_applied_total", 0))
                    service.process.send_signal(signal.SIGKILL)
                    service.process.wait(30)
                    service._log.close()
                    kills += 1
            producing.join()
            wait_for("caught up and quiet", lambda: _quiet(service, args.quiet_s), WAIT_S)
            wait_for("healthy", lambda: (service.health() or {}).get("status") == "ok", 120)
            time.sleep(2 * settings.serve.published_record_every_s)
            records, positions, kinds = dead_letter_positions(settings)
            report = service.stop(60)
        store = store_accounting(settings.store.path)
        # The last run's report counts only its own duplicates; the store's commit rows count
        # redeliveries (offsets) and retries (ids) of every run together.
        con = duckdb.connect(str(settings.store.path), read_only=True)
        dropped = int(con.execute("SELECT coalesce(sum(n_duplicates), 0) FROM commits").fetchone()[0])
        con.close()
        duplicates = sum(c.produced for c in chunks) - store["applied"] - len(positions)
        result = {
            "bench": "kills", "events": args.events, "kills": kills, "rate": args.rate,
            "seconds": round(time.monotonic() - started, 1), "applied_at_kill": applied_at_kill,
            "dead_letter_records": records, "dead_letter_kinds": kinds,
            "store_duplicates_dropped (ids and redelivered offsets)": dropped,
            "last_run_report": {k: report.get(k) for k in ("events_applied", "duplicates", "dead_letters")},
        }
        return check(result, chunks, len(positions), store, duplicates)


def _quiet(service: ServeProcess, quiet_s: float) -> bool:
    """Whether the service is caught up (lag 0 on every partition) and applied nothing for `quiet_s`."""
    first = service.metrics()
    if not first or first.get("casm_consumer_lag", 1) != 0:
        return False
    time.sleep(quiet_s)
    second = service.metrics()
    return second.get("casm_consumer_lag", 1) == 0 and second.get("casm_events_applied_total") == first.get(
        "casm_events_applied_total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["restarts", "kills"])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=3_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--down-s", type=float, default=2.0, help="seconds the broker stays down")
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--kill-every-s", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=5_000.0, help="events/s produced during the kills")
    parser.add_argument("--quiet-s", type=float, default=3.0, help="no new event for this long: done")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = bench_restarts(args) if args.bench == "restarts" else bench_kills(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
