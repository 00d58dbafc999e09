"""Offline evaluation: a historical log through the paper's protocol, for several model variants
and seeds, with the mean and standard deviation of every metric.

Composes `stream.logs` (reading) and `casm_core` (split, training, scoring, metrics); the
`casm evaluate` command reads the log, makes the split and runs `run_variant` per variant and seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from casm_core.baselines import MostPopular
from casm_core.model import CASM
from casm_core.protocol import EncodedEvents, Split, evaluate, heldout_split, leave_one_out
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


@dataclass(frozen=True)
class Variant:
    """A model variant: CASM with settings overrides, or a non-learned baseline."""

    name: str
    description: str
    kind: str = "casm"
    uniform_alpha: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def load_variants(path: Path = VARIANTS_FILE) -> dict[str, Variant]:
    """Variants by name from the TOML file (one table per variant)."""
    with open(path, "rb") as handle:
        raw = tomllib.load(handle)
    return {name: Variant(name=name, **spec) for name, spec in raw.items()}


@dataclass
class EncodedLog:
    """A log as dense codes plus the vocabularies that decode them."""

    events: EncodedEvents
    user_ids: np.ndarray
    items: Vocabulary


def encode_log(table: pa.Table, behaviour_names: Sequence[str], extra_items: Sequence[str] = ()) -> EncodedLog:
    """Dense codes of a log (columns user_id, item_id, behavior; chronological order). Items are
    numbered by first appearance; `extra_items` (e.g. held-out test items) are added after.
    Raises ValueError naming behaviours that are not in `behaviour_names`."""
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
    )
    return EncodedLog(events, user_ids, items)


def make_split(
    encoded: EncodedLog, settings: CasmSettings, heldout: pa.Table | None = None
) -> Split:
    """The leave-one-out split on the target behaviour, or the held-out split when test items
    are given apart from the log."""
    cfg = settings.eval
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


def variant_settings(settings: CasmSettings, variant: Variant, seed: int) -> CasmSettings:
    """The settings a variant trains with: overrides applied, alpha made uniform if asked."""
    data = settings.model_dump()
    for section, values in variant.overrides.items():
        data[section].update(values)
    if variant.uniform_alpha:
        data["behaviours"]["alpha"] = {name: 1.0 for name in settings.behaviours.names}
    data["train"]["seed"] = seed
    return CasmSettings.model_validate(data)


def run_variant(
    split: Split, encoded: EncodedLog, settings: CasmSettings, variant: Variant, seed: int
) -> dict[str, Any]:
    """Train (if learned) and test one variant with one seed; returns metrics and training facts."""
    cfg = settings.eval
    started = time.perf_counter()
    if variant.kind == "mostpop":
        counts = np.bincount(split.train.items, minlength=split.num_items + 1)
        metrics = evaluate(
            MostPopular(counts).score_all, split.test, split.history, settings.model.max_len,
            cfg.ks, cfg.batch_size,
        )
        return {"variant": variant.name, "seed": seed, "test": metrics, "seconds": time.perf_counter() - started}

    vs = variant_settings(settings, variant, seed)
    trainer = Trainer(vs.model, vs.train, vs.behaviours, item_ids=encoded.items.ids(), device=resolve_device(vs.device))
    target = vs.behaviours.target_index()
    width = vs.model.max_len

    def validate(model: CASM) -> dict[str, float]:
        scorer = Scorer(model, target)  # the weights of this moment, for every batch
        return evaluate(scorer.score_all, split.validation, split.history, width, cfg.ks, cfg.batch_size)

    report = trainer.fit(split.train, validate, progress=settings.progress, description=f"{variant.name} seed {seed}")
    test = evaluate(
        Scorer(trainer.model, target).score_all, split.test, split.history, width, cfg.ks, cfg.batch_size,
        progress=settings.progress, description="test",
    )
    return {
        "variant": variant.name,
        "seed": seed,
        "test": test,
        "validation": report.best_metrics,
        "epochs": report.epochs,
        "best_epoch": report.best_epoch,
        "train_seconds": report.seconds,
        "sequences_per_second": report.sequences_per_second,
        "seconds": time.perf_counter() - started,
        "settings": {"model": vs.model.model_dump(), "train": vs.train.model_dump(), "alpha": trainer.alpha},
    }


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std (population, over seeds) of every test metric, per variant."""
    by_variant: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run["test"])
    summary = {}
    for name, tests in by_variant.items():
        keys = tests[0].keys()
        summary[name] = {
            key: {"mean": float(np.mean([t[key] for t in tests])), "std": float(np.std([t[key] for t in tests]))}
            for key in keys
        }
    return summary


def format_table(summary: dict[str, dict[str, dict[str, float]]], ks: Sequence[int]) -> str:
    """A Markdown table: one row per variant, sampled and full HR/NDCG at every K, mean ± std."""
    columns = [f"{proto}.{m}@{k}" for proto in ("sampled", "full") for k in ks for m in ("hr", "ndcg")]
    header = "| variant | users | " + " | ".join(columns) + " |"
    rule = "|" + " --- |" * (len(columns) + 2)
    rows = [header, rule]
    for name, metrics in summary.items():
        cells = [name, f"{metrics['users']['mean']:.0f}"]
        for column in columns:
            mean, std = metrics[column]["mean"], metrics[column]["std"]
            cells.append(f"{mean:.4f} ± {std:.4f}" if not math.isnan(mean) else "n/a")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
