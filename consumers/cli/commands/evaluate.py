"""``casm evaluate``: the paper's offline protocol on a historical log, for CASM, its baselines and
ablations, over several seeds; prints tables (metrics with bootstrap intervals, paired differences
against the best baseline and the reference variant) and writes a JSON result.

JSON layout: data facts; ``protocol`` (the split, the full-ranking candidates and the intervals in
words), ``eval`` (every eval setting); ``test_cases`` {user_id, item_id} in case order;
``summary`` {variant: {metric: {mean, std, low, high}}} (``users``, the number of test cases: mean,
std); ``differences`` {"baseline" | "reference": {variant: {metric: {against, mean, low, high,
excludes_zero}}}};
``runs``: one per variant and seed with ``kind``, ``test`` and ``validation`` metrics and the test
``ranks`` {sampled, full} (0-based, in ``test_cases`` order), plus training facts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from casm_core.config import EvalConfig
from consumers.cli.options import add_alias
from consumers.evaluation.offline import (
    BASELINES,
    VARIANTS_FILE,
    aggregate,
    compare,
    describe_protocol,
    dumps_result,
    encode_log,
    format_differences,
    format_table,
    format_validation,
    load_variants,
    make_split,
    run_variant,
)
from consumers.presets import FORMAT_PRESETS
from consumers.settings import CasmSettings
from stream.logs import LOG_FORMATS, read_heldout, read_log

NAME = "evaluate"
HELP = "Train and evaluate CASM and baselines offline on a historical log (leave-one-out, HR/NDCG)."

log = logging.getLogger(__name__)

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=None, help="log file or data-set folder")
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None,
        help="instead of running: merge result JSONs of the same split (variants run apart) into --output",
    )
    parser.add_argument("--format", default="generic", choices=LOG_FORMATS, help="log format")
    add_alias(parser, "--target", "behaviours.target", CasmSettings)
    parser.add_argument(
        "--heldout", type=Path, default=None,
        help="CSV user_id,item_id of test items given apart from the log (e.g. yelp heldout_pos.csv.gz)",
    )
    parser.add_argument(
        "--variants", default="casm,sasrec,casm-uniform,mostpop",
        help=f"comma-separated variants of --variants-file (default file: {sorted(load_variants())})",
    )
    parser.add_argument(
        "--variants-file", type=Path, default=VARIANTS_FILE, help="TOML file of the variants (one table each)"
    )
    parser.add_argument(
        "--reference", default="sasrec",
        help="learned variant every other learned variant is also compared with (paired), when it runs",
    )
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--output", type=Path, default=None, help="JSON result path (default: runs/...)")
    parser.add_argument("--skip-malformed", action="store_true", help="skip (and count) malformed rows")


def default_preset(args: argparse.Namespace) -> str | None:
    """The preset of the log's format when --preset is not given."""
    return FORMAT_PRESETS.get(args.format)


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    if args.merge:
        if args.output is None:
            raise SystemExit("casm evaluate --merge needs --output")
        return merge(args.merge, args.reference, args.output)
    if args.data is None:
        raise SystemExit("casm evaluate: --data is required (or --merge)")
    if settings.train.threads:
        torch.set_num_threads(settings.train.threads)
    try:
        variants = load_variants(args.variants_file)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"casm evaluate: {exc}") from None
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
        split = make_split(encoded, settings, heldout)
    except (ValueError, FileNotFoundError) as exc:  # LogFormatError is a ValueError
        raise SystemExit(f"casm evaluate: {exc}") from None
    log.info(
        "%s: %d events, %d users, %d items; evaluating %d users (skipped: %s)",
        loaded.path, loaded.num_events, encoded.events.num_users, encoded.events.num_items,
        len(split.test), split.skipped,
    )
    runs = []
    for name in chosen:
        variant = variants[name]
        for seed in seeds if variant.kind not in BASELINES else seeds[:1]:
            result = run_variant(split, encoded, settings, variant, seed)
            log.info("%s seed %d: test %s", name, seed, {k: round(v, 4) for k, v in result["test"].items()})
            runs.append(result)
    cfg = settings.eval
    result = {
        "data": str(loaded.path),
        "format": args.format,
        "events": loaded.num_events,
        "rows_skipped": loaded.rows_skipped,
        "users": encoded.events.num_users,
        "items": encoded.events.num_items,
        "evaluated_users": len(split.test),
        "evaluated_distinct_users": int(len(set(split.test.users.tolist()))),
        "validation_cases": len(split.validation),
        "skipped_users": split.skipped,
        "protocol": describe_protocol(cfg, heldout is not None, split.test.users),
        "behaviours": settings.behaviours.model_dump(),
        "eval": cfg.model_dump(),
        "seeds": seeds,
        "test_cases": {
            "user_id": encoded.user_ids[split.test.users].tolist(),
            "item_id": encoded.items.id_of(split.test.positives),
        },
        "runs": runs,
    }
    output = args.output or Path("runs") / f"evaluate-{Path(args.data).name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    return _finish(result, cfg, args.reference, output)


def _finish(result: dict, cfg: EvalConfig, reference: str, output: Path) -> int:
    """Summary, differences and tables of `result["runs"]`; writes the JSON, prints the tables."""
    runs = result["runs"]
    _, groups = np.unique(np.asarray(result["test_cases"]["user_id"], dtype=str), return_inverse=True)
    summary = aggregate(runs, cfg, groups)
    differences = compare(runs, summary, cfg, reference, groups)
    tables = [
        format_table(summary, cfg, result["protocol"]),
        format_differences(differences["baseline"], cfg, "Paired difference, variant minus the best baseline "
                           "per metric by its test mean"),
        format_differences(differences["reference"], cfg, f"Paired difference, variant minus {reference}"),
        format_validation(runs, cfg),
    ]
    result = {**result, "summary": summary, "differences": differences}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(dumps_result(result))
    print("\n\n".join(table for table in tables if table))
    print(
        f"\n{result['evaluated_users']} test cases ({result['evaluated_distinct_users']} users); skipped: "
        f"{result['skipped_users']}; result: {output}"
    )
    return 0


def merge(paths: list[Path], reference: str, output: Path) -> int:
    """``casm evaluate --merge``: one result from several runs of the same split (e.g. variants run
    in parallel processes); refuses results whose test cases or evaluation settings differ."""
    results = [json.loads(path.read_text()) for path in paths]
    first = results[0]
    for path, other in zip(paths[1:], results[1:], strict=True):
        if other["test_cases"] != first["test_cases"] or other["eval"] != first["eval"]:
            raise SystemExit(f"casm evaluate --merge: {path} has other test cases or eval settings than {paths[0]}")
    runs = [run for result in results for run in result["runs"]]
    seen = {(run["variant"], run["seed"]) for run in runs}
    if len(seen) != len(runs):
        raise SystemExit("casm evaluate --merge: a variant and seed appear twice")
    merged = {**first, "runs": runs, "seeds": sorted({s for r in results for s in r["seeds"]}), "merged_from": [str(p) for p in paths]}
    return _finish(merged, EvalConfig.model_validate(first["eval"]), reference, output)
