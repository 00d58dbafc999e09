"""``casm status``: one row per `casm serve` instance of a scale-out deployment, read from the
status topic (`topics.status`), and whether the ingest instances agree on the model version and
split the partitions without overlap."""

from __future__ import annotations

import argparse
import json
import logging
import time

from kafka.errors import KafkaTimeoutError

from consumers.cli.startup import EXIT_STARTUP, option
from consumers.serve.status import format_status, read_status, statuses_json
from consumers.settings import CasmSettings
from stream.clients import make_consumer, topic_partitions
from stream.config import KafkaConfig

NAME = "status"
HELP = (
    "Show every `casm serve` instance of the cluster (role, state, partitions, lag, model version and "
    "its age, events applied) from the status topic; exit 0 when there was a record, 1 when none."
)

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 30.0
"""Default longest wait for the status topic's metadata and its end (s): a one-partition topic of
small records is read in well under a second when the cluster answers."""
STALE_PERIODS = 3
"""An instance whose newest record is this many status periods old is shown as stale."""
TAIL_RECORDS = 10_000
"""Default records read from the end of the status topic: with 4 instances every 2 s, the last
80 minutes (an instance silent for longer is not shown)."""
EXIT_BAD_INPUT = 2
"""Exit status when the command cannot run as configured (argparse's code for bad options)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print instance -> newest status record as JSON")
    parser.add_argument(
        "--stale-after-s", type=float, default=None, metavar="SECONDS",
        help=f"show a running instance as stale when its newest record is older than this "
        f"[default: {STALE_PERIODS} x scale.status_every_s]",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=READ_TIMEOUT_S, metavar="SECONDS",
        help=f"longest wait for the status topic [default: {READ_TIMEOUT_S:g}]",
    )
    parser.add_argument(
        "--records", type=int, default=TAIL_RECORDS, metavar="N",
        help=f"read only the status topic's last N records (0: all) [default: {TAIL_RECORDS}]",
    )


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    bootstrap = settings.kafka.bootstrap_servers.strip()
    if not bootstrap:
        log.error(
            "status needs a running cluster: set %s to the cluster the `casm serve` instances use "
            "(an embedded broker started for this command would hold no status)",
            option("kafka.bootstrap_servers"),
        )
        return EXIT_BAD_INPUT
    topic = settings.topics.status
    try:
        statuses = read_status(settings.kafka, bootstrap, topic, args.timeout_s, tail=args.records or None)
    except KafkaTimeoutError as exc:
        log.error("cannot reach the Kafka cluster at %s (%s): check %s and %s", bootstrap, exc,
                  option("kafka.bootstrap_servers"), option("kafka.security_protocol"))
        return EXIT_STARTUP
    except TimeoutError as exc:
        log.error("cannot read the status topic (%s): is %s the topic the instances publish to (%s)?",
                  exc, topic, option("topics.status"))
        return 1
    if args.json:
        print(json.dumps(statuses_json(statuses), indent=2))
    elif statuses:
        stale_after_s = args.stale_after_s
        if stale_after_s is None:
            stale_after_s = STALE_PERIODS * settings.scale.status_every_s
        expected = behaviours_partitions(settings.kafka, bootstrap, settings.topics.behaviours, args.timeout_s)
        print(format_status(statuses, time.time(), stale_after_s, expected))
    else:
        print(f"no status record in {topic} at {bootstrap}: no `casm serve --role ingest|trainer` has "
              "published yet")
    return 0 if statuses else 1


def behaviours_partitions(kafka_cfg: KafkaConfig, bootstrap: str, topic: str, timeout_s: float) -> int | None:
    """The partition count of the behaviours `topic` in the cluster (what the ingest instances must
    cover), or None when the topic does not show within `timeout_s` seconds."""
    consumer = make_consumer(kafka_cfg, bootstrap, group_id=None)
    try:
        return len(topic_partitions(consumer, topic, timeout_s))
    except TimeoutError:
        log.warning("the behaviours topic %s is not in the cluster: partition coverage not checked", topic)
        return None
    finally:
        consumer.close()
