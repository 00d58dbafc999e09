"""The live service's performance targets, measured on the embedded broker (issue: consumers).

    .venv/bin/python bench/bench_serve.py ingest    --events 200000
    .venv/bin/python bench/bench_serve.py freshness --events 60000 --rate 2000
    .venv/bin/python bench/bench_serve.py memory    --events 1000000 --sample-s 2
    .venv/bin/python bench/bench_serve.py refresh

- ingest: the raw kafka-python consume rate of a topic (the ceiling) and, in the same run on the
  same broker and topic, the rate at which `casm serve` consumes, validates and applies it to the
  store, with training on and refresh on (and, unless --no-signals, test-then-train ranking and
  drift detection). Reports the ratio.
- freshness: `casm serve` fed at a steady rate while it fine-tunes; the distribution of event
  produce time -> refreshed recommendation published (`--recommender popularity`: the same path
  without a model, the pipeline's own cost).
- memory: a long synthetic run; the serve process's RSS sampled along the way and its peak, and
  the size of the dashboard's /api/timeline answer (its history small enough to fill up early).
- refresh: users per second the serving path scores (the publisher's cost per list), with the
  last-position shortcut of inference and with the full encoding, side by side.

Each prints a JSON result (and writes it to --json); BENCHMARKS.md quotes them with the command.
"""

from __future__ import annotations

import argparse
import threading
import time
import urllib.request
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import psutil
from bench_report import run_and_report  # (bench/ is on the path: these run as scripts)

from consumers.evaluation.live import ServeProcess, run_live
from consumers.settings import CasmSettings
from stream.broker import EmbeddedBroker, free_port
from stream.clients import make_consumer, make_producer, topic_partitions
from stream.config import BrokerConfig, SyntheticConfig
from stream.replay import parse_pacing, replay
from stream.synthetic import generate
from stream.topics import ensure_topics


def settings_for(folder: Path, bootstrap: str, **serve) -> CasmSettings:
    settings = CasmSettings(progress=False)
    settings.kafka.bootstrap_servers = bootstrap
    settings.store.path = folder / "state.duckdb"
    settings.serve.checkpoint_dir = folder / "checkpoints"
    settings.serve.metrics_port = free_port("127.0.0.1")
    for key, value in serve.items():
        setattr(settings.serve, key, value)
    return settings


def produce(settings: CasmSettings, bootstrap: str, events) -> float:
    producer = make_producer(settings.kafka, bootstrap)
    report = replay(events, producer, settings.topics.behaviours, parse_pacing(None, None, True), progress=False)
    producer.close()
    return report.rate


def raw_consume_rate(settings: CasmSettings, bootstrap: str, total: int) -> float:
    """Events/s of a bare kafka-python consumer reading the whole topic (no decoding)."""
    consumer = make_consumer(settings.kafka, bootstrap, group_id=None)
    partitions = topic_partitions(consumer, settings.topics.behaviours, 30)
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    count, started = 0, time.perf_counter()
    while count < total:
        for records in consumer.poll(timeout_ms=200, max_records=settings.kafka.max_poll_records).values():
            count += len(records)
    rate = count / (time.perf_counter() - started)
    consumer.close()
    return rate


def bench_ingest(args: argparse.Namespace) -> dict:
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        settings = settings_for(folder, broker.bootstrap)
        settings.drift.enabled = not args.no_signals
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        events = generate(SyntheticConfig(n_events=args.events, seed=1)).events
        produce_rate = produce(settings, broker.bootstrap, events)
        raw = raw_consume_rate(settings, broker.bootstrap, args.events)
        serve = ServeProcess(settings, folder / "serve.log")
        serve.wait_assigned(300)
        started, applied = time.perf_counter(), 0.0
        while applied < args.events:
            time.sleep(0.5)
            applied = serve.metrics().get("casm_events_applied_total", 0.0)
        seconds = time.perf_counter() - started
        metrics = serve.metrics()
        report = serve.stop(300)
    ingest = args.events / seconds
    return {
        "events": args.events,
        "test_then_train_signals": not args.no_signals,
        "produce_events_per_s": round(produce_rate),
        "raw_consume_events_per_s": round(raw),
        "serve_ingest_events_per_s": round(ingest),
        "ratio_to_raw": round(ingest / raw, 3),
        "fine_tunes_during_ingest": int(metrics.get("casm_fine_tunes_total", 0)),
        "recommendations": report.get("recommendations"),
        "events_scored_test_then_train": report.get("events_scored"),
    }


def bench_freshness(args: argparse.Namespace) -> dict:
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        settings = settings_for(folder, broker.bootstrap, recommender=args.recommender)
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        events = generate(SyntheticConfig(n_events=args.events, seed=2)).events
        result = run_live(settings, broker.bootstrap, events, parse_pacing(None, f"{args.rate}/s", False),
                          folder, "bench", progress=False)
    pq = result.prequential
    return {
        "events": args.events,
        "rate_events_per_s": args.rate,
        "recommender": args.recommender,
        "fine_tunes": result.serve.get("fine_tunes"),
        "recommendations": pq.get("freshness_count"),
        "freshness_p50_ms": round(pq.get("freshness_p50_ms", float("nan")), 1),
        "freshness_p90_ms": round(pq.get("freshness_p90_ms", float("nan")), 1),
        "freshness_p99_ms": round(pq.get("freshness_p99_ms", float("nan")), 1),
        "freshness_max_ms": round(pq.get("freshness_max_ms", float("nan")), 1),
        "freshness_histogram_ms": pq.get("freshness_histogram"),
        "drained": result.drained,
    }


def bench_memory(args: argparse.Namespace) -> dict:
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        settings = settings_for(folder, broker.bootstrap)
        # The dashboard's history fills up within the run, so that its bound shows (the default,
        # 720 points of 5 s, fills in an hour).
        settings.serve.timeline_points = args.timeline_points
        settings.serve.timeline_every_s = args.timeline_every_s
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        events = generate(SyntheticConfig(n_events=args.events, seed=3, n_users=args.users)).events
        sender = threading.Thread(target=produce, args=(settings, broker.bootstrap, events), daemon=True)
        sender.start()
        serve = ServeProcess(settings, folder / "serve.log")
        process = psutil.Process(serve.process.pid)
        samples: list[tuple[float, float, float, int]] = []  # (s, events applied, RSS MiB of serve + trainer, /api/timeline bytes)
        started, applied = time.perf_counter(), 0.0
        while applied < args.events and serve.process.poll() is None:
            time.sleep(args.sample_s)
            try:
                rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
            except psutil.Error:
                break
            applied = serve.metrics().get("casm_events_applied_total", applied)
            samples.append((round(time.perf_counter() - started, 1), applied, round(rss / 2**20, 1),
                            timeline_bytes(serve.metrics_url)))
        sender.join()
        serve.stop(300)
    quarter = max(1, len(samples) // 4)
    return {
        "events": args.events,
        "users": args.users,
        "seconds": samples[-1][0] if samples else None,
        "peak_rss_mib": max(s[2] for s in samples) if samples else None,
        "rss_mib_first_quarter_max": max(s[2] for s in samples[:quarter]) if samples else None,
        "rss_mib_last_quarter_max": max(s[2] for s in samples[-quarter:]) if samples else None,
        "samples_every_s": args.sample_s,
        "rss_by_events": [(int(s[1]), s[2]) for s in samples[:: max(1, len(samples) // 20)]],
        "timeline_points": args.timeline_points,
        "timeline_every_s": args.timeline_every_s,
        "timeline_bytes_first_quarter_max": max(s[3] for s in samples[:quarter]) if samples else None,
        "timeline_bytes_last_quarter_max": max(s[3] for s in samples[-quarter:]) if samples else None,
        "timeline_bytes_by_events": [(int(s[1]), s[3]) for s in samples[:: max(1, len(samples) // 20)]],
    }


def timeline_bytes(metrics_url: str) -> int:
    """Size of the dashboard's /api/timeline answer (bytes; -1 when it does not answer)."""
    try:
        with urllib.request.urlopen(metrics_url + "/api/timeline", timeout=10) as answer:
            return len(answer.read())
    except OSError:
        return -1


def bench_refresh(args: argparse.Namespace) -> dict:
    """Users scored per second by the serving path (`Scorer.score_all`, the default model shape,
    1 torch thread), with the last-position shortcut of inference and with the full encoding."""
    import torch

    from casm_core.model import CASM
    from casm_core.scoring import Scorer

    torch.set_num_threads(1)
    settings = CasmSettings(progress=False)
    num_items, width = 2_000, settings.model.max_len
    model = CASM(settings.model, num_items, len(settings.behaviours.names))
    scorer = Scorer(model, len(settings.behaviours.names))
    rng = np.random.default_rng(0)
    items = rng.integers(1, num_items + 1, (args.users, width))
    behaviours = rng.integers(1, len(settings.behaviours.names) + 1, (args.users, width))

    def rate(represent) -> float:
        original = model.user_representation
        model.user_representation = represent
        try:
            scorer.score_all(items, behaviours)  # warm-up
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < args.seconds:
                scorer.score_all(items, behaviours)
                count += 1
            return count * args.users / (time.perf_counter() - started)
        finally:
            model.user_representation = original

    shortcut = rate(model.user_representation)
    full = rate(lambda its, bes: model.encode(its, bes)[:, -1, :])
    return {"users_per_batch": args.users, "window": width, "hidden_dim": settings.model.hidden_dim,
            "blocks": settings.model.num_blocks, "users_per_s_last_position_shortcut": round(shortcut),
            "users_per_s_full_encoding": round(full), "ratio": round(shortcut / full, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ingest", "freshness", "memory", "refresh"])
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--rate", type=int, default=2000, help="freshness: events/s")
    parser.add_argument("--users", type=int, default=None,
                        help="memory: users of the synthetic stream [20000]; refresh: users per scoring batch [256]")
    parser.add_argument("--seconds", type=float, default=5.0, help="refresh: seconds of each measurement")
    parser.add_argument("--sample-s", type=float, default=5.0, help="memory: RSS sampling period")
    parser.add_argument("--timeline-points", type=int, default=20,
                        help="memory: serve.timeline_points (small, so the dashboard history fills within the run)")
    parser.add_argument("--timeline-every-s", type=float, default=0.5, help="memory: serve.timeline_every_s")
    parser.add_argument("--no-signals", action="store_true",
                        help="ingest: without test-then-train ranking and drift detection (drift.enabled=false)")
    parser.add_argument("--recommender", choices=["casm", "popularity", "recent"], default="casm",
                        help="freshness: serve.recommender (popularity and recent: no model, no trainer)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    defaults = {"ingest": 200_000, "freshness": 60_000, "memory": 1_000_000, "refresh": 0}
    args.events = args.events or defaults[args.what]
    args.users = args.users or (256 if args.what == "refresh" else 20_000)
    measure = {"ingest": bench_ingest, "freshness": bench_freshness, "memory": bench_memory,
               "refresh": bench_refresh}[args.what]
    run_and_report(lambda: measure(args), args.json)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
