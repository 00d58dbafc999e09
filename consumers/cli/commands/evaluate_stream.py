"""``casm evaluate-stream``: replay a log through the production path (Kafka in, `casm serve`,
Kafka out) and score what users were sent, prequentially; writes a report folder with tables
and plots."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import get_args

from consumers.evaluation.live import run_live
from casm_core.metrics import metrics_of_lists
from consumers.presets import FORMAT_PRESETS
from consumers.settings import CasmSettings, ServeConfig
from consumers.evaluation.stream_report import test_then_train_metrics, two_losses, write_report
from stream.broker import free_port, kafka_cluster
from stream.logs import LOG_FORMATS, read_log
from stream.replay import parse_pacing
from stream.synthetic import generate
from stream.topics import ensure_topics

NAME = "evaluate-stream"
HELP = "Replay a log through broker + casm serve and score the published recommendations prequentially."

log = logging.getLogger(__name__)

POLICIES = {"fixed": "fixed", "adaptive": "conversion", "conversion": "conversion", "gradient": "gradient"}
RECOMMENDERS = get_args(ServeConfig.model_fields["recommender"].annotation)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="log file or data-set folder")
    source.add_argument("--synthetic", action="store_true", help="the synthetic stream (settings `synthetic`)")
    parser.add_argument("--format", default="generic", choices=LOG_FORMATS, help="log format")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", default=None, help="event-time speed-up, e.g. 600x")
    pace.add_argument("--rate", default=None, help="events per second, e.g. 2000/s")
    pace.add_argument("--max", action="store_true", help="as fast as possible (the default)")
    parser.add_argument("--policy", choices=sorted(POLICIES), default=None,
                        help="alpha policy: fixed, conversion (alias adaptive) or gradient [drift.policy]")
    parser.add_argument("--recommender", choices=RECOMMENDERS, default=None,
                        help="what serves: CASM, or a baseline through the same path (popularity: the most "
                        "popular items; recent: the user's recently seen items first) [serve.recommender]")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N events")
    parser.add_argument("--partitions", type=int, default=None,
                        help="partitions of the topics this run creates [1 at --max, else topics.partitions]")
    parser.add_argument("--training", choices=["deterministic", "continuous"], default=None,
                        help="deterministic: a fixed number of steps per 1,000 events, consumption waiting for "
                        "each round, so two runs agree and results do not depend on machine speed "
                        "[deterministic at --max, else serve.training]")
    parser.add_argument("--clock", choices=["wall", "event_order"], default=None,
                        help="when a list counts as sent before an event [event_order at --max, else live.clock]")
    parser.add_argument("--report-dir", type=Path, default=None, help="report folder [live.runs_dir/...]")


def default_preset(args: argparse.Namespace) -> str | None:
    return FORMAT_PRESETS.get(args.format)


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    settings = settings.model_copy(deep=True)
    if args.policy:
        settings.drift.policy = POLICIES[args.policy]
    if args.recommender:
        settings.serve.recommender = args.recommender
    if args.data is not None:
        loaded = read_log(args.data, args.format)
        events = loaded.events if args.limit is None else loaded.events.slice(0, args.limit)
        name, label = Path(args.data).name, f"{loaded.path} ({args.format})"
        scheduled_drifts: list[int] = []
    else:
        config = settings.synthetic if args.limit is None else settings.synthetic.model_copy(update={"n_events": args.limit})
        stream = generate(config)
        events, name = stream.events, stream.source_name
        label = f"SYNTHETIC stream (seed {config.seed}, {config.n_users} users; drifts {[d.model_dump(exclude_none=True) for d in config.drifts]})"
        scheduled_drifts = [d.at_event for d in config.drifts]
    fastest = args.max or not (args.speed or args.rate)
    pacing = parse_pacing(args.speed, args.rate, fastest)
    if args.clock:
        settings.live.clock = args.clock
    elif fastest:
        settings.live.clock = "event_order"  # wall-clock order is meaningless at full speed
    if args.training:
        settings.serve.training = args.training
    elif fastest:
        settings.serve.training = "deterministic"
    if fastest:
        # Lists are refreshed once per poll: at full speed the poll size is the granularity of what
        # the evaluation can credit (a paced stream has small polls by itself).
        settings.kafka.max_poll_records = min(settings.kafka.max_poll_records, settings.live.full_speed_poll_records)
        settings.serve.refresh_max_delay_ms = 0
        # A backlog is consumed faster than lists can be refreshed; in step with the publisher
        # (one batch ahead at most), every list reflects the batch before, as a service keeping
        # up with a live stream would, and recommenders are compared on their lists, not on
        # how fast they make them.
        settings.serve.publisher_queue_batches = 1
        if args.partitions is None:
            # A backlog of several partitions is consumed one partition after another, so the model
            # would see one partition's future before another's past: one partition keeps log order.
            settings.topics.partitions = 1
    if args.partitions is not None:
        settings.topics.partitions = args.partitions
    run_dir = args.report_dir or settings.live.runs_dir / (
        f"evaluate-stream-{name}-{settings.serve.recommender}-{settings.drift.policy}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    settings.store.path = run_dir / "state.duckdb"
    settings.serve.checkpoint_dir = run_dir / "checkpoints"
    if not settings.serve.metrics_port:
        settings.serve.metrics_port = free_port(settings.serve.metrics_host)
    initial_alpha = {b: settings.behaviours.alpha_of(b) for b in settings.behaviours.names}

    with kafka_cluster(settings.kafka, settings.broker) as bootstrap:
        if settings.kafka.bootstrap_servers:  # a shared cluster: topics of our own for this run
            suffix = run_dir.name
            for field in ("behaviours", "recommendations", "dead_letters", "scores"):
                if getattr(settings.topics, field):
                    setattr(settings.topics, field, f"{getattr(settings.topics, field)}.{suffix}")
        settings.kafka.bootstrap_servers = bootstrap
        ensure_topics(bootstrap, settings.kafka, settings.topics)
        print(f"casm evaluate-stream: {label}\n  {events.num_rows:,} events at {pacing}; report in {run_dir}", flush=True)
        result = run_live(settings, bootstrap, events, pacing, run_dir, name, progress=settings.progress,
                          produce_first=fastest)

    k = settings.serve.top_k
    scorer = result.prequential_scorer
    warm_target = [s for s in scorer.scored if s.behaviour == settings.behaviours.target and not s.cold]
    threshold = settings.live.cold_user_events
    metrics = {
        "command": "casm " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "data": label,
        "events": events.num_rows,
        "pace": str(pacing),
        "produced_first": fastest,
        "policy": settings.drift.policy,
        "recommender": settings.serve.recommender,
        "has_model": settings.serve.has_model,
        "target": settings.behaviours.target,
        "k": k,
        "seconds": result.seconds,
        "drained": result.drained,
        "initial_alpha": initial_alpha,
        "scheduled_drifts": scheduled_drifts,
        "window_events": settings.live.window_events,
        "training_mode": settings.serve.training,
        "prequential": result.prequential,
        "cold_users": {
            "threshold": threshold,
            "new": metrics_of_lists([s.rank for s in warm_target if s.history < threshold], k),
            "established": metrics_of_lists([s.rank for s in warm_target if s.history >= threshold], k),
        },
        "test_then_train": test_then_train_metrics(
            result.scores, settings.behaviours.target, k, settings.live.window_events, result.positions
        ),
        "serve": result.serve,
        "replay": result.replay,
        "monitor": result.monitor,
        "timeline": result.timeline,
    }
    metrics["two_losses"] = two_losses(metrics["prequential"], metrics["test_then_train"], k)
    report = write_report(run_dir, metrics, scorer.freshness_ms)
    pq, tt = metrics["prequential"], metrics["test_then_train"]
    print(
        f"\n{label}: {events.num_rows:,} events, {result.serve.get('fine_tunes', 0)} fine-tunes, "
        f"drained={result.drained}\n"
        f"  published top-{k} before each {settings.behaviours.target}: HR@{k} {pq[f'hr@{k}']:.4f} "
        f"NDCG@{k} {pq[f'ndcg@{k}']:.4f} MRR {pq['mrr']:.4f} over {pq['scored']:,} events ({pq['cold']:,} cold)\n"
        f"  test-then-train, 1 + {tt['num_sampled']} sampled: HR@{k} {tt['sampled'][f'hr@{k}']:.4f} "
        f"NDCG@{k} {tt['sampled'][f'ndcg@{k}']:.4f} over {tt['sampled']['n']:,} events\n"
        f"  test-then-train full HR@{k} {tt['full'][f'hr@{k}']:.4f}: staleness (published - model) "
        f"{metrics['two_losses']['staleness']:+.4f}\n"
        f"  freshness p50 {pq.get('freshness_p50_ms', float('nan')):.0f} ms, p99 {pq.get('freshness_p99_ms', float('nan')):.0f} ms\n"
        f"  report: {report}"
    )
    return 0 if result.drained else 1
