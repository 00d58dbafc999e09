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

from casm_core.metrics import metrics_of_lists
from consumers.cli.options import add_alias
from consumers.cli.profiles import Profile
from consumers.evaluation.live import run_live
from consumers.evaluation.stream_report import test_then_train_metrics, two_losses, write_report
from consumers.presets import FORMAT_PRESETS
from consumers.settings import CasmSettings
from stream.broker import free_port, kafka_cluster
from stream.logs import LOG_FORMATS, read_log
from stream.replay import parse_pacing
from stream.synthetic import generate
from stream.topics import ensure_topics

NAME = "evaluate-stream"
HELP = "Replay a log through broker + casm serve and score the published recommendations prequentially."

log = logging.getLogger(__name__)

EVALUATION = Profile("evaluate-stream", {
    "drift.user_share": (1.0, "every user watched: the report's test-then-train hit rate is over every target "
                         "event, as in earlier rounds (a service samples them: `casm serve` defaults to a share)"),
})
"""What every `evaluate-stream` run changes, below every explicit setting."""

FULL_SPEED = Profile("evaluate-stream --max", {
    **EVALUATION.settings,
    "live.clock": ("event_order", "wall-clock order is meaningless when the whole log is produced first"),
    "serve.training": ("deterministic", "a fixed number of steps per 1,000 events, ingestion waiting for "
                       "each round: results do not depend on the machine's speed and two runs agree"),
    "kafka.max_poll_records": (20, "lists are refreshed once per poll, so at full speed the poll size is "
                               "the granularity of what the evaluation can credit (a paced stream has "
                               "small polls by itself)"),
    "serve.refresh_max_delay_ms": (0, "refresh every poll's users at once"),
    "serve.publisher_queue_batches": (1, "in step with the publisher (one batch ahead at most), every list "
                                      "reflects the batch before, as a service keeping up with a live "
                                      "stream would: recommenders are compared on their lists, not on how "
                                      "fast they make them"),
    "topics.partitions": (1, "a backlog of several partitions is consumed one after another, so the model "
                          "would see one partition's future before another's past: one keeps log order"),
})
"""What `--max` (the default pace) changes, below every explicit setting."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="log file or data-set folder")
    source.add_argument("--synthetic", action="store_true", help="the synthetic stream (settings `synthetic`)")
    parser.add_argument("--format", default="generic", choices=LOG_FORMATS, help="log format")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", default=None, help="event-time speed-up, e.g. 600x")
    pace.add_argument("--rate", default=None, help="events per second, e.g. 2000/s")
    pace.add_argument(
        "--max", action="store_true",
        help="as fast as possible (the default without --speed or --rate): the log is produced first and "
        f"the profile '{FULL_SPEED.name}' applies, below explicit settings (a preset, CASM_ variable or "
        f"option of the same setting wins): {FULL_SPEED.help_text()}",
    )
    add_alias(parser, "--policy", "drift.policy", CasmSettings)
    add_alias(parser, "--recommender", "serve.recommender", CasmSettings)
    add_alias(parser, "--training", "serve.training", CasmSettings)
    add_alias(parser, "--clock", "live.clock", CasmSettings)
    add_alias(parser, "--partitions", "topics.partitions", CasmSettings)
    parser.add_argument("--limit", type=int, default=None,
                        help="replay only the first N events of the log or of the synthetic stream (whose length "
                        "is --synthetic.n-events)")
    parser.add_argument("--report-dir", type=Path, default=None, help="report folder [live.runs_dir/...]")


def _fastest(args: argparse.Namespace) -> bool:
    return bool(args.max or not (args.speed or args.rate))


def profile(args: argparse.Namespace) -> Profile | None:
    """The full-speed profile at --max (and when no pace is given), else the evaluation profile."""
    return FULL_SPEED if _fastest(args) else EVALUATION


def default_preset(args: argparse.Namespace) -> str | None:
    return FORMAT_PRESETS.get(args.format)


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    settings = settings.model_copy(deep=True)
    if args.data is not None:
        loaded = read_log(args.data, args.format)
        events = loaded.events if args.limit is None else loaded.events.slice(0, args.limit)
        name, label = Path(args.data).name, f"{loaded.path} ({args.format})"
        scheduled_drifts: list[int] = []
    else:
        config = settings.synthetic
        stream = generate(config)
        events = stream.events if args.limit is None else stream.events.slice(0, args.limit)
        name = stream.source_name
        label = f"SYNTHETIC stream (seed {config.seed}, {config.n_users} users; drifts {[d.model_dump(exclude_none=True) for d in config.drifts]})"
        scheduled_drifts = [d.at_event for d in config.drifts]
    fastest = _fastest(args)
    pacing = parse_pacing(args.speed, args.rate, fastest)
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
        "profile": dict(zip(("applied", "replaced"), profile(args).outcome(settings), strict=True)),
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
