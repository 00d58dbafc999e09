"""``casm demo``: the main job. Starts the embedded broker (unless a cluster is configured),
creates the topics, runs `casm serve`, replays the synthetic stream (or a real log) into
`behaviours`, shows live progress, writes a short report and stops everything it started."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from consumers.cli.options import add_alias
from consumers.evaluation.live import run_live
from consumers.evaluation.stream_report import test_then_train_metrics, write_plots
from consumers.settings import CasmSettings
from stream.broker import free_port, kafka_cluster
from stream.logs import LOG_FORMATS, read_log
from stream.replay import parse_pacing
from stream.synthetic import generate
from stream.topics import ensure_topics

NAME = "demo"
HELP = "One command: embedded broker + casm serve + a replayed stream, with live progress and a report."

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_alias(parser, "--events", "live.demo_events", CasmSettings)
    pace = parser.add_mutually_exclusive_group()
    add_alias(pace, "--rate", "live.demo_rate", CasmSettings)
    pace.add_argument("--speed", default=None, help="event-time speed-up, e.g. 600x")
    pace.add_argument("--max", action="store_true", help="as fast as possible")
    parser.add_argument("--data", type=Path, default=None, help="replay this real log instead of the synthetic stream")
    parser.add_argument("--format", default="generic", choices=LOG_FORMATS, help="format of --data")
    parser.add_argument("--run-dir", type=Path, default=None, help="folder of this run [live.runs_dir/demo-TIME]")


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    run_dir = args.run_dir or settings.live.runs_dir / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    count = settings.live.demo_events
    if args.data is not None:
        loaded = read_log(args.data, args.format)
        events, source = loaded.events.slice(0, count), f"{Path(args.data).name}"
        label = f"{loaded.path} ({args.format}), first {events.num_rows} events"
        scheduled_drifts: list[int] = []
    else:
        synthetic = settings.synthetic.model_copy(update={"n_events": count})
        stream = generate(synthetic)
        events, source = stream.events, stream.source_name
        label = f"SYNTHETIC stream (seed {synthetic.seed}, {synthetic.n_users} users, {synthetic.n_items} items)"
        scheduled_drifts = [d.at_event for d in synthetic.drifts if d.at_event < events.num_rows]
    pacing = parse_pacing(args.speed, None if args.max or args.speed else settings.live.demo_rate, args.max)

    # The demo keeps its state next to its report: the embedded broker forgets everything on stop.
    settings = settings.model_copy(deep=True)
    settings.store.path = run_dir / "state.duckdb"
    settings.serve.checkpoint_dir = run_dir / "checkpoints"
    if not settings.serve.metrics_port:
        settings.serve.metrics_port = free_port(settings.serve.metrics_host)
    with kafka_cluster(settings.kafka, settings.broker) as bootstrap:
        settings.kafka.bootstrap_servers = bootstrap
        ensure_topics(bootstrap, settings.kafka, settings.topics)
        print(f"casm demo: {label}\n  broker {bootstrap}, pace {pacing}, run folder {run_dir}\n"
              f"  dashboard {dashboard_url(settings)}", flush=True)
        result = run_live(settings, bootstrap, events, pacing, run_dir, source, progress=settings.progress)
    report = {
        "data": label,
        "synthetic": args.data is None,
        "events": events.num_rows,
        "pace": str(pacing),
        "seconds": round(result.seconds, 1),
        "drained": result.drained,
        "replay": result.replay,
        "serve": result.serve,
        "prequential": result.prequential,
        "monitor": result.monitor,
        "timeline": result.timeline,
    }
    k = settings.serve.top_k
    plots = write_plots(run_dir, {
        "k": k,
        "prequential": result.prequential,
        "test_then_train": test_then_train_metrics(result.scores, settings.behaviours.target, k,
                                                   settings.live.window_events, result.positions),
        "scheduled_drifts": scheduled_drifts,
        "initial_alpha": {b: settings.behaviours.alpha_of(b) for b in settings.behaviours.names},
        "serve": result.serve,
        "timeline": result.timeline,
    }, result.prequential_scorer.freshness_ms)
    report["plots"] = {key: path.name for key, path in plots.items()}
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    text = format_demo_report(report, k)
    (run_dir / "report.md").write_text(text)
    print(text)
    print(f"plots in {run_dir}: {', '.join(path.name for path in plots.values())}")
    return 0 if result.drained and result.serve.get("events_applied") == events.num_rows else 1


def dashboard_url(settings: CasmSettings) -> str:
    """The live dashboard of the service this demo starts (`GET /` on its metrics server)."""
    return f"http://{settings.serve.metrics_host}:{settings.serve.metrics_port}/"


PLOT_CAPTIONS = {
    "hit_rate": "HR@{k} over the stream, with the scheduled drifts",
    "freshness": "freshness: event produced -> recommendation published (ms)",
    "alpha": "alpha per behaviour, with the drift detections",
    "throughput": "events/s produced and applied, consumer lag",
}
"""Caption of each plot (keys of `stream_report.PLOT_FILES`) in the demo's report.md."""


def format_demo_report(report: dict, k: int) -> str:
    """report.md of a demo run from its report.json dict: a short summary, then the plots
    (`report["plots"]`: key -> file name in the run folder) as markdown image links."""
    pq, serve, monitor = report["prequential"], report["serve"], report["monitor"]
    freshness = [f"{label}: {n}" for label, n in pq.get("freshness_histogram", [])]
    lines = [
        "# casm demo report",
        "",
        f"- data: {report['data']}" + (" — SYNTHETIC, not real behaviour" if report["synthetic"] else ""),
        f"- events replayed: {report['events']:,} at {report['pace']}; run took {report['seconds']} s; "
        f"all users' newest events reflected: {'yes' if report['drained'] else 'NO'}",
        f"- service: {serve.get('events_applied', 0):,} events applied, {serve.get('duplicates', 0)} duplicates "
        f"dropped, {serve.get('dead_letters', 0)} dead letters, {serve.get('recommendations', 0):,} "
        f"recommendations ({serve.get('popularity_fallbacks', 0):,} popularity fallbacks), "
        f"{serve.get('fine_tunes', 0)} fine-tunes, final model version {serve.get('model_version', 0)}",
        f"- freshness (event produced -> recommendation published): p50 {pq.get('freshness_p50_ms', float('nan')):.0f} ms, "
        f"p90 {pq.get('freshness_p90_ms', float('nan')):.0f} ms, p99 {pq.get('freshness_p99_ms', float('nan')):.0f} ms "
        f"over {pq.get('freshness_count', 0):,} recommendations",
        f"- freshness histogram (ms): {', '.join(freshness)}",
        f"- prequential hit rate of the published top-{k} on later target events: HR@{k} "
        f"{pq.get(f'hr@{k}', float('nan')):.4f}, NDCG@{k} {pq.get(f'ndcg@{k}', float('nan')):.4f}, "
        f"MRR {pq.get('mrr', float('nan')):.4f} over {pq.get('scored', 0):,} target events "
        f"({pq.get('cold', 0):,} cold: no recommendation yet); by source {pq.get('by_source', {})}",
        f"- recommendations by model version: {monitor.get('model_versions', {})}",
        "",
    ]
    plots = report.get("plots", {})
    if plots:
        lines += ["## Plots", ""]
        for key, name in plots.items():
            caption = PLOT_CAPTIONS.get(key, key).format(k=k)
            lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)
