"""Offline evaluation: a historical log through the paper's protocol, for several model variants
and seeds, with the mean and standard deviation of every metric over seeds, a bootstrap interval
over users, and paired differences against the best baseline (and a reference variant).

Composes `stream.logs` (reading) and `casm_core` (split, training, scoring, metrics, bootstrap);
the `casm evaluate` command reads the log, makes the split (leave-one-out, held-out items, or a
global time cut: `eval.split`) and runs `run_variant` per variant and seed. Baselines (kinds in
`BASELINES`: "mostpop", "recent") need no training: they are built from the item counts of the
training events and evaluated on validation and test like every model. Each run keeps the 0-based rank of every
test case (`ranks.sampled`, `ranks.full`, in the split's case order, the same for every run), from
which `aggregate` and `compare` bootstrap.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from casm_core.baselines import MostPopular, RecentItems
from casm_core.bootstrap import Interval, metric_interval, paired_difference
from casm_core.config import EvalConfig
from casm_core.model import CASM
from casm_core.protocol import (
    EncodedEvents,
    Split,
    evaluate,
    heldout_split,
    leave_one_out,
    rank_cases,
    summarize_ranks,
    time_cut_split,
)
from casm_core.scoring import Scorer
from casm_core.trainer import Trainer, resolve_device
from casm_core.vocab import Vocabulary
from consumers.settings import CasmSettings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

VARIANTS_FILE = Path(__file__).parent / "variants.toml"

# Non-learned variant kinds: scorers built from the training events' item counts [num_items + 1].
BASELINES = {"mostpop": MostPopular, "recent": RecentItems}


@dataclass(frozen=True)
class Variant:
    """A model variant: CASM with settings overrides, or a non-learned baseline."""

    name: str
    description: str
    kind: str = "casm"
    uniform_alpha: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def load_variants(path: Path = VARIANTS_FILE) -> dict[str, Variant]:
    """Variants by name from the TOML file (one table per variant). Raises ValueError for a kind
    other than "casm" and the `BASELINES`."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    variants = {name: Variant(name=name, **spec) for name, spec in raw.items()}
    kinds = {"casm", *BASELINES}
    unknown = {v.name: v.kind for v in variants.values() if v.kind not in kinds}
    if unknown:
        raise ValueError(f"{path}: unknown variant kinds {unknown}; known: {sorted(kinds)}")
    return variants


@dataclass
class EncodedLog:
    """A log as dense codes plus the vocabularies that decode them."""

    events: EncodedEvents
    user_ids: np.ndarray
    items: Vocabulary


def encode_log(table: pa.Table, behaviour_names: Sequence[str], extra_items: Sequence[str] = ()) -> EncodedLog:
    """Dense codes of a log (columns user_id, item_id, behavior, and timestamp if present, unix
    seconds; chronological order). Items are numbered by first appearance; `extra_items` (e.g.
    held-out test items) are added after. Raises ValueError naming behaviours that are not in
    `behaviour_names`."""
    behaviours = table.column("behavior").to_numpy(zero_copy_only=False).astype(str)
    names = [str(name) for name in behaviour_names]
    found = np.unique(behaviours)
    unknown = sorted(set(found.tolist()) - set(names))
    if unknown:
        raise ValueError(
            f"the log has behaviours {unknown} outside the vocabulary {names}; "
            "choose a preset (--preset) or set --behaviours.names"
        )
    lookup = {name: i + 1 for i, name in enumerate(names)}
    behaviour_codes = np.fromiter((lookup[b] for b in found.tolist()), np.int64)[
        np.searchsorted(found, behaviours)
    ]
    user_ids, user_codes = np.unique(
        table.column("user_id").to_numpy(zero_copy_only=False).astype(str), return_inverse=True
    )
    items = Vocabulary()
    item_codes = items.add(table.column("item_id").to_numpy(zero_copy_only=False))
    items.add(np.asarray(list(extra_items), dtype=object))
    events = EncodedEvents(
        users=user_codes.astype(np.int64).reshape(-1),
        items=item_codes,
        behaviours=behaviour_codes,
        num_users=len(user_ids),
        num_items=len(items),
        timestamps=(
            table.column("timestamp").to_numpy(zero_copy_only=False).astype(np.float64)
            if "timestamp" in table.column_names else None
        ),
    )
    return EncodedLog(events, user_ids, items)


def make_split(
    encoded: EncodedLog, settings: CasmSettings, heldout: pa.Table | None = None
) -> Split:
    """The split of `eval.split` on the target behaviour ("last": leave-one-out; "time_cut"), or
    the held-out split when test items are given apart from the log. Raises ValueError for a time
    cut with held-out items or without timestamps."""
    cfg = settings.eval
    if cfg.split == "time_cut":
        if heldout is not None:
            raise ValueError("eval.split=time_cut needs test events in the log; it cannot use --heldout items")
        return time_cut_split(
            encoded.events,
            target=settings.behaviours.target_index(),
            validation_quantile=cfg.time_cut_validation_quantile,
            test_quantile=cfg.time_cut_test_quantile,
            num_sampled=cfg.num_sampled_negatives,
            seed=cfg.seed,
            min_train_events=cfg.min_train_events,
        )
    if heldout is None:
        return leave_one_out(
            encoded.events,
            target=settings.behaviours.target_index(),
            num_sampled=cfg.num_sampled_negatives,
            seed=cfg.seed,
            min_train_events=cfg.min_train_events,
        )
    user_lookup = {u: i for i, u in enumerate(encoded.user_ids.tolist())}
    held_users = heldout.column("user_id").to_pylist()
    known = np.array([u in user_lookup for u in held_users], dtype=bool)
    if not known.all():
        log.warning("%d held-out users have no events in the log; skipped", int((~known).sum()))
    users = np.array([user_lookup[u] for u, k in zip(held_users, known, strict=False) if k], dtype=np.int64)
    items = encoded.items.lookup(np.asarray(heldout.column("item_id").to_pylist(), dtype=object)[known])
    validation = cfg.validation_behaviours
    validation_codes = None if not validation else [settings.behaviours.names.index(b) + 1 for b in validation]
    split = heldout_split(
        encoded.events,
        users,
        items,
        num_sampled=cfg.num_sampled_negatives,
        seed=cfg.seed,
        validation_behaviours=validation_codes,
        min_train_events=cfg.min_train_events,
    )
    split.skipped["held-out user not in the log"] = int((~known).sum())
    return split


def describe_protocol(cfg: EvalConfig, heldout: bool, case_users: np.ndarray) -> dict[str, str]:
    """The split, the full-ranking candidate set and the intervals in words (for the JSON and the
    table captions); `case_users` [N] is the user of each test case."""
    if heldout:
        split = "held-out test items after each user's whole sequence; validation on the last event (of eval.validation_behaviours)"
    elif cfg.split == "time_cut":
        split = (
            f"time cut: every target event at or after the {cfg.time_cut_test_quantile:g} quantile of event "
            f"time is a test case, validation from the {cfg.time_cut_validation_quantile:g} quantile; "
            "training on events before the validation cut"
        )
    else:
        split = "leave-one-out: each user's last target event, validation on the one before"
    full = (
        "every item except those of the user's events before the case (the positive kept)"
        if cfg.full_exclude_history else "every known item (history items kept)"
    )
    interval = (
        f"{cfg.bootstrap_confidence:.0%} percentile bootstrap interval over the "
        f"{np.unique(case_users).size} test users ({len(case_users)} cases; a drawn user brings all "
        f"their cases), {cfg.bootstrap_replicates} replicates, seed {cfg.bootstrap_seed}; per-case "
        "values averaged over seeds first"
    )
    return {"split": split, "full_ranking": full, "interval": interval}


def variant_settings(settings: CasmSettings, variant: Variant, seed: int) -> CasmSettings:
    """The settings a variant trains with: overrides applied, alpha made uniform if asked."""
    data = settings.model_dump()
    for section, values in variant.overrides.items():
        data[section].update(values)
    if variant.uniform_alpha:
        data["behaviours"]["alpha"] = {name: 1.0 for name in settings.behaviours.names}
    data["train"]["seed"] = seed
    return CasmSettings.model_validate(data)


def _ranks_json(ranks) -> dict[str, list[int]]:
    return {"sampled": ranks.sampled.tolist(), "full": ranks.full.tolist()}


def run_variant(
    split: Split, encoded: EncodedLog, settings: CasmSettings, variant: Variant, seed: int
) -> dict[str, Any]:
    """Train (if learned) and test one variant with one seed: test metrics and per-case ranks,
    validation metrics (the best validation of training for learned variants) and training facts."""
    cfg = settings.eval
    started = time.perf_counter()
    exclude = cfg.full_exclude_history
    if variant.kind in BASELINES:
        counts = np.bincount(split.train.items, minlength=split.num_items + 1)
        score_all = BASELINES[variant.kind](counts).score_all
        width = settings.model.max_len
        validation = evaluate(
            score_all, split.validation, split.history, width, cfg.ks, cfg.batch_size, exclude_history=exclude
        )
        ranks = rank_cases(score_all, split.test, split.history, width, cfg.batch_size, exclude)
        return {
            "variant": variant.name, "kind": variant.kind, "seed": seed,
            "test": summarize_ranks(ranks, cfg.ks), "validation": validation, "ranks": _ranks_json(ranks),
            "seconds": time.perf_counter() - started,
        }

    vs = variant_settings(settings, variant, seed)
    trainer = Trainer(vs.model, vs.train, vs.behaviours, item_ids=encoded.items.ids(), device=resolve_device(vs.device))
    target = vs.behaviours.target_index()
    width = vs.model.max_len

    def validate(model: CASM) -> dict[str, float]:
        scorer = Scorer(model, target)  # the weights of this moment, for every batch
        return evaluate(
            scorer.score_all, split.validation, split.history, width, cfg.ks, cfg.batch_size, exclude_history=exclude
        )

    report = trainer.fit(split.train, validate, progress=settings.progress, description=f"{variant.name} seed {seed}")
    ranks = rank_cases(
        Scorer(trainer.model, target).score_all, split.test, split.history, width, cfg.batch_size, exclude,
        progress=settings.progress, description="test",
    )
    return {
        "variant": variant.name,
        "kind": variant.kind,
        "seed": seed,
        "test": summarize_ranks(ranks, cfg.ks),
        "validation": report.best_metrics,
        "ranks": _ranks_json(ranks),
        "steps": report.steps,
        "best_step": report.best_step,
        "epochs": report.epochs,
        "stopped_early": report.stopped_early,
        "train_seconds": report.seconds,
        "sequences_per_second": report.sequences_per_second,
        "seconds": time.perf_counter() - started,
        "settings": {"model": vs.model.model_dump(), "train": vs.train.model_dump(), "alpha": trainer.alpha},
    }


def _split_key(key: str) -> tuple[str, str]:
    """``"sampled.ndcg@10"`` -> ``("sampled", "ndcg@10")``."""
    protocol, _, metric = key.partition(".")
    return protocol, metric


def _rank_matrix(runs: list[dict[str, Any]], variant: str, protocol: str) -> np.ndarray:
    """Test ranks int64 [seeds, cases] of `variant` in `protocol` ("sampled" or "full")."""
    return np.array([run["ranks"][protocol] for run in runs if run["variant"] == variant], dtype=np.int64)


def _interval_json(value: Interval) -> dict[str, Any]:
    return {"mean": value.mean, "low": value.low, "high": value.high, "excludes_zero": value.excludes_zero()}


def aggregate(
    runs: list[dict[str, Any]], cfg: EvalConfig, groups: np.ndarray | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Per variant and test metric: mean and std (population, over seeds) and the bootstrap
    interval ("low", "high") of the per-case value averaged over seeds, resampling the users
    `groups` [N] of the test cases (default: one case per user)."""
    by_variant: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["test"])
    summary = {}
    for name, tests in by_variant.items():
        summary[name] = {}
        for key in tests[0]:
            values = [t[key] for t in tests]
            entry = {"mean": float(np.mean(values)), "std": float(np.std(values))}
            if key != "users":
                protocol, metric = _split_key(key)
                ci = metric_interval(
                    _rank_matrix(runs, name, protocol), metric, cfg.bootstrap_replicates, cfg.bootstrap_seed,
                    cfg.bootstrap_confidence, groups,
                )
                entry.update(low=ci.low, high=ci.high)
            summary[name][key] = entry
    return summary


def compare(
    runs: list[dict[str, Any]], summary: dict[str, dict[str, dict[str, float]]], cfg: EvalConfig,
    reference: str | None = None, groups: np.ndarray | None = None,
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Paired differences on the test cases, per learned variant and metric: against the best
    baseline of that metric by test mean ("baseline"; the "against" field names it), and against
    the learned variant `reference` when it ran ("reference"). Each: mean, low, high,
    excludes_zero; users resampled as in `aggregate`."""
    kinds = {run["variant"]: run["kind"] for run in runs}
    baselines = [name for name in summary if kinds[name] in BASELINES]
    learned = [name for name in summary if kinds[name] not in BASELINES]
    result: dict[str, dict[str, dict[str, dict[str, Any]]]] = {"baseline": {}, "reference": {}}
    metrics = [key for key in (summary[learned[0]] if learned else {}) if key != "users"]
    for key in metrics:
        protocol, metric = _split_key(key)
        pairs = []
        if baselines:
            best = max(baselines, key=lambda name: summary[name][key]["mean"])
            pairs += [("baseline", name, best) for name in learned]
        if reference in learned:
            pairs += [("reference", name, reference) for name in learned if name != reference]
        for table, name, against in pairs:
            diff = paired_difference(
                _rank_matrix(runs, name, protocol), _rank_matrix(runs, against, protocol), metric,
                cfg.bootstrap_replicates, cfg.bootstrap_seed, cfg.bootstrap_confidence, groups,
            )
            result[table].setdefault(name, {})[key] = {"against": against, **_interval_json(diff)}
    return result


def _table_columns(k: int) -> list[str]:
    return [f"{protocol}.{metric}@{k}" for protocol in ("sampled", "full") for metric in ("hr", "ndcg")]


def format_table(
    summary: dict[str, dict[str, dict[str, float]]], cfg: EvalConfig, protocol: dict[str, str]
) -> str:
    """Markdown: a caption (split, full-ranking candidates, interval) and one row per variant
    with sampled and full HR/NDCG at `cfg.table_k`: mean over seeds [bootstrap interval]."""
    columns = _table_columns(cfg.table_k)
    caption = (
        f"Test: {protocol['split']}. Full ranking: {protocol['full_ranking']}. Mean over seeds "
        f"[{protocol['interval']}]."
    )
    rows = [caption, "", "| variant | cases | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for name, metrics in summary.items():
        cells = [name, f"{metrics['users']['mean']:.0f}"]
        for column in columns:
            m = metrics[column]
            cells.append(f"{m['mean']:.4f} [{m['low']:.4f}, {m['high']:.4f}]" if not math.isnan(m["mean"]) else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_differences(differences: dict[str, dict[str, dict[str, Any]]], cfg: EvalConfig, caption: str) -> str:
    """Markdown: `caption`, then per variant the paired difference at `cfg.table_k`, its interval
    and * where the interval excludes 0; empty when there is nothing to compare."""
    if not differences:
        return ""
    columns = _table_columns(cfg.table_k)
    against = {c: next(iter(differences.values()))[c]["against"] for c in columns}
    named = ", ".join(f"{c}: {a}" for c, a in against.items())
    rows = [
        f"{caption} ({named}); mean [{cfg.bootstrap_confidence:.0%} paired bootstrap interval, the same "
        "resampled users for both]; * the interval excludes 0.",
        "", "| variant | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1),
    ]
    for name, metrics in differences.items():
        cells = [name]
        for column in columns:
            d = metrics[column]
            mark = " *" if d["excludes_zero"] else ""
            cells.append(f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]{mark}")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_validation(runs: list[dict[str, Any]], cfg: EvalConfig) -> str:
    """Markdown: every variant's validation metrics at `cfg.table_k` (mean over seeds), the numbers
    defaults are chosen by; learned variants' are those of their best validation."""
    columns = _table_columns(cfg.table_k)
    by_variant: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        if run.get("validation"):
            by_variant.setdefault(run["variant"], []).append(run["validation"])
    if not by_variant:
        return ""
    rows = ["Validation (what defaults are chosen by), mean over seeds:", "",
            "| variant | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for name, values in by_variant.items():
        rows.append("| " + " | ".join([name] + [f"{np.mean([v[c] for v in values]):.4f}" for c in columns]) + " |")
    return "\n".join(rows)


# A list of numbers or plain strings, as json.dumps(indent=...) spreads it over lines.
_SCALAR = r'(?:-?[0-9][0-9.eE+-]*|"[^"\\\n]*"|true|false|null|NaN|-?Infinity)'
_SCALAR_LIST = re.compile(r"\[\s*" + _SCALAR + r"(?:,\s*" + _SCALAR + r")*\s*\]")


def dumps_result(result: dict[str, Any]) -> str:
    """JSON indented by 2, except that lists of scalars (ranks, ids, ks) stay on one line."""
    text = json.dumps(result, indent=2)
    return _SCALAR_LIST.sub(lambda m: re.sub(r"\n\s*", "", m.group(0)), text)
