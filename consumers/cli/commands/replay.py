"""``casm replay``: produce a historical log (or the synthetic stream) to the behaviours topic."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pyarrow.compute as pc

from consumers.cli.options import add_alias
from consumers.settings import CasmSettings
from stream.clients import make_producer
from stream.logs import LOG_FORMATS, read_log
from stream.replay import SYNTHETIC_CONTEXT, parse_pacing, replay
from stream.synthetic import generate, is_synthetic_log
from stream.topics import ensure_topics

NAME = "replay"
HELP = (
    "Produce a historical log (or the synthetic stream) to the behaviours topic in time order, "
    "keyed by user, at --speed 60x (event time), --rate 5000/s or --max (the default)."
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="log file (or its data set folder)")
    source.add_argument(
        "--synthetic", action="store_true",
        help="replay the SYNTHETIC stream of stream.synthetic instead of a log (the `synthetic` "
        "settings, e.g. --synthetic.n-users 20 --synthetic.drifts '[{\"at_event\": 25000, "
        "\"behaviour\": \"cart\", \"conversion\": 0}]')",
    )
    parser.add_argument("--format", default="generic", choices=LOG_FORMATS, help="log format [generic]")
    parser.add_argument("--skip-malformed", action="store_true", help="skip malformed rows (counted)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--speed", help="event-time speed-up, e.g. 60x")
    pace.add_argument("--rate", help="events per second, e.g. 5000/s")
    pace.add_argument("--max", action="store_true", help="as fast as the producer goes (default)")
    parser.add_argument("--limit", type=int, default=None, help="send only the first N events")
    add_alias(parser, "--topic", "topics.behaviours", CasmSettings)
    add_alias(parser, "--seed", "synthetic.seed", CasmSettings)
    add_alias(parser, "--events", "synthetic.n_events", CasmSettings)
    parser.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    bootstrap = settings.kafka.bootstrap_servers.strip()
    if not bootstrap:
        log.error(
            "replay needs a running broker: start one with `casm broker` and set "
            "CASM_KAFKA__BOOTSTRAP_SERVERS (or --kafka.bootstrap-servers) to the address it prints"
        )
        return 2
    try:
        pacing = parse_pacing(args.speed, args.rate, args.max)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    context = None
    if args.synthetic:
        stream = generate(settings.synthetic)
        events, source_name = stream.events, stream.source_name
    else:
        loaded = read_log(args.data, args.format, skip_malformed=args.skip_malformed)
        events, source_name = loaded.events, f"{loaded.path.parent.name}/{loaded.path.name}"
        if is_synthetic_log(loaded.path):
            context = SYNTHETIC_CONTEXT
    names = set(pc.unique(events.column("behavior")).to_pylist())
    unknown = sorted(names - set(settings.behaviours.names))
    if unknown and not settings.events.open_vocabulary:
        log.warning(
            "behaviours %s are not in the vocabulary %s: the service will dead-letter them "
            "(choose a preset or set events.open_vocabulary)", unknown, settings.behaviours.names,
        )
    topic = settings.topics.behaviours
    if not args.no_create_topics:
        ensure_topics(bootstrap, settings.kafka, settings.topics)
    producer = make_producer(settings.kafka, bootstrap)
    try:
        report = replay(
            events, producer, topic, pacing,
            source_name=source_name, progress=settings.progress, limit=args.limit, context=context,
        )
    finally:
        producer.close()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0 if report.failed == 0 and not report.interrupted else 1
