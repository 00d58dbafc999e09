"""``casm serve``: the live service (consume behaviours, keep state, fine-tune, publish top-K)."""

from __future__ import annotations

import argparse
import json
import logging

from consumers.cli.options import add_alias
from consumers.serve.service import Service
from consumers.settings import CasmSettings
from stream.broker import kafka_cluster
from stream.topics import ensure_topics

NAME = "serve"
HELP = "Run the live service: behaviours in, state in DuckDB, CASM fine-tuned, recommendations out."

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_alias(parser, "--role", "scale.role", CasmSettings)
    parser.add_argument(
        "--idle-exit-s", type=float, default=None,
        help="stop once caught up (every partition read to its high watermark) and no new event "
        "arrived for this many seconds (batch jobs, tests); default: never",
    )
    parser.add_argument("--no-create-topics", action="store_true", help="do not create missing topics")
    parser.add_argument("--json", action="store_true", help="print the final report as JSON")


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    with kafka_cluster(settings.kafka, settings.broker) as bootstrap:
        if not args.no_create_topics:
            ensure_topics(bootstrap, settings.kafka, settings.topics)
        service = Service(settings, bootstrap)
        service.install_signal_handlers()
        until = None
        if args.idle_exit_s is not None:

            def until(svc: Service) -> bool:
                idle = svc.idle_s()
                return idle is not None and idle >= args.idle_exit_s

        report = service.run(until)
    summary = vars(report)
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"casm serve stopped ({report.stopped_by}) after {report.seconds:.1f} s: "
            f"{report.events_applied} events applied, {report.duplicates} duplicates dropped, "
            f"{report.dead_letters} dead letters, {report.recommendations} recommendations "
            f"({report.popularity_fallbacks} popularity), model version {report.model_version}"
        )
    return 0
