"""``casm schemas``: (re)write the published JSON Schemas of our messages."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from consumers.settings import CasmSettings
from stream.schema_files import SCHEMA_DIR, stale_schemas, write_schemas

NAME = "schemas"
HELP = (
    "Write the JSON Schemas of behaviour events, recommendations and dead letters "
    f"(default into {SCHEMA_DIR.parent.name}/{SCHEMA_DIR.name}/)."
)

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help=f"folder to write to [default: {SCHEMA_DIR}]")
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 if the committed default schemas are out of date",
    )
    parser.add_argument(
        "--deployment", action="store_true",
        help="use this deployment's event limits and behaviour vocabulary (settings) instead of the "
        "published defaults; needs --out",
    )


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    if args.check:
        stale = stale_schemas(args.out or SCHEMA_DIR)
        if stale:
            print(f"out of date: {', '.join(stale)} (run `casm schemas`)")
            return 1
        print("schemas are up to date")
        return 0
    if args.deployment:
        if args.out is None:
            log.error("--deployment writes a deployment's variant: give --out DIR (the committed files "
                      "keep the defaults)")
            return 2
        paths = write_schemas(args.out, settings.events, settings.behaviours.names)
    else:
        paths = write_schemas(args.out or SCHEMA_DIR)
    for path in paths:
        print(path)
    return 0
