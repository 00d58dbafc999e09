"""``casm evaluate``: the paper's offline protocol on a historical log, for CASM, its baselines and
ablations, over several seeds; prints a table and writes a JSON result."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from consumers.offline import (
    aggregate,
    encode_log,
    format_table,
    load_variants,
    make_split,
    run_variant,
)
from consumers.settings import CasmSettings
from stream.logs import LOG_FORMATS, read_heldout, read_log

NAME = "evaluate"
HELP = "Train and evaluate CASM and baselines offline on a historical log (leave-one-out, HR/NDCG)."

log = logging.getLogger(__name__)

# A format's natural preset, used when --preset is not given.
FORMAT_PRESETS = {"movielens": "movielens", "taobao": "taobao", "retailrocket": "retailrocket"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="log file or data-set folder")
    parser.add_argument("--format", default="generic", choices=LOG_FORMATS, help="log format")
    parser.add_argument("--target", default=None, help="target behaviour (shortcut for --behaviours.target)")
    parser.add_argument(
        "--heldout", type=Path, default=None,
        help="CSV user_id,item_id of test items given apart from the log (e.g. yelp heldout_pos.csv.gz)",
    )
    parser.add_argument(
        "--variants", default="casm,sasrec,casm-uniform,mostpop",
        help=f"comma-separated variants of {sorted(load_variants())}",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--output", type=Path, default=None, help="JSON result path (default: runs/...)")
    parser.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed rows")


def default_preset(args: argparse.Namespace) -> str | None:
    """The preset of the log's format when --preset is not given."""
    return FORMAT_PRESETS.get(args.format)


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    if args.target:
        settings.behaviours.target = args.target
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    variants = load_variants()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    missing = [v for v in chosen if v not in variants]
    if missing:
        raise SystemExit(f"unknown variants {missing}; known: {sorted(variants)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    try:
        loaded = read_log(args.data, args.format, skip_malformed=args.skip_malformed)
        heldout = read_heldout(args.heldout) if args.heldout else None
        extra_items = heldout.column("item_id").to_pylist() if heldout is not None else ()
        encoded = encode_log(loaded.events, settings.behaviours.names, extra_items)
    except (ValueError, FileNotFoundError) as exc:  # LogFormatError is a ValueError
        raise SystemExit(f"casm evaluate: {exc}") from None
    split = make_split(encoded, settings, heldout)
    log.info(
        "%s: %d events, %d users, %d items; evaluating %d users (skipped: %s)",
        loaded.path, loaded.num_events, encoded.events.num_users, encoded.events.num_items,
        len(split.test), split.skipped,
    )
    runs = []
    for name in chosen:
        variant = variants[name]
        for seed in seeds if variant.kind != "mostpop" else seeds[:1]:
            result = run_variant(split, encoded, settings, variant, seed)
            log.info("%s seed %d: test %s", name, seed, {k: round(v, 4) for k, v in result["test"].items()})
            runs.append(result)
    summary = aggregate(runs)
    table = format_table(summary, settings.eval.ks)
    output = args.output or Path("runs") / f"evaluate-{Path(args.data).name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "data": str(loaded.path),
        "format": args.format,
        "events": loaded.num_events,
        "rows_skipped": loaded.rows_skipped,
        "users": encoded.events.num_users,
        "items": encoded.events.num_items,
        "evaluated_users": len(split.test),
        "skipped_users": split.skipped,
        "behaviours": settings.behaviours.model_dump(),
        "eval": settings.eval.model_dump(),
        "seeds": seeds,
        "summary": summary,
        "runs": runs,
    }
    output.write_text(json.dumps(result, indent=2))
    print(table)
    print(f"\n{len(split.test)} users evaluated; skipped: {split.skipped}; result: {output}")
    return 0
