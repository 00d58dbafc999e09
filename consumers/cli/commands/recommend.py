"""``casm recommend --user U``: a user's current top-K from the state store and the newest model,
for debugging. Reads the store read-only, so it runs beside a stopped service (DuckDB lets one
process write a file; while `casm serve` runs, read its `recommendations` topic instead)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from casm_core.baselines import RecentItems
from casm_core.checkpoint import load_checkpoint
from casm_core.scoring import Scorer
from consumers.cli.options import add_alias
from consumers.serve.ranking import PopularItems, exclusions, ranked_lists
from consumers.serve.service import open_store
from consumers.settings import CasmSettings

NAME = "recommend"
HELP = "Print a user's current top-K (state store + newest model checkpoint)."

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, action="append", help="user id (repeatable)")
    add_alias(parser, "--k", "serve.top_k", CasmSettings)
    parser.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint [newest registered]")


def recommend(settings: CasmSettings, users: list[str], k: int, checkpoint: Path | None = None) -> list[dict]:
    """Top-`k` of each user as plain dicts, as `casm serve` would publish them (source "model",
    "recent" for that baseline, or "popularity" when the user has no history, there is no model
    or `serve.recommender` is popularity), with the same exclusions (`consumers.serve.ranking`)."""
    with open_store(settings, read_only=True) as store:
        if checkpoint is None:
            latest = store.registry.latest_model()
            checkpoint = Path(latest["checkpoint_path"]) if latest and latest["checkpoint_path"] else None
        item_ids = store.item_ids()
        sequences = store.sequences(users, width=settings.model.max_len)
        counts = store.item_popularity(settings.serve.popularity_behaviours or None)
        names = store.behaviour_names()
    ranker, source, version = None, "popularity", None
    if settings.serve.recommender == "recent":
        ranker, source = RecentItems(counts), "recent"
    elif settings.serve.has_model and checkpoint is not None and checkpoint.exists():
        trainer, metadata = load_checkpoint(checkpoint)
        if trainer.items.ids() != item_ids[: len(trainer.items)]:
            raise SystemExit(f"{checkpoint} numbers items differently from the store; it is not this store's model")
        ranker, source = Scorer(trainer.model, trainer.behaviours.target_index()), "model"
        version = metadata.get("version")
    exclude = exclusions(sequences.items, sequences.behaviours, names, settings.serve.exclude_behaviours)
    lists = [(ranked, "popularity") for ranked in
             ranked_lists(PopularItems(counts), sequences.items, sequences.behaviours, k, exclude)]
    known = np.flatnonzero(sequences.lengths > 0)
    if ranker is not None and known.size:
        ranked = ranked_lists(ranker, sequences.items[known], sequences.behaviours[known], k,
                              None if exclude is None else exclude[known])
        for row, row_list in zip(known.tolist(), ranked, strict=True):
            lists[row] = (row_list, source)
    return [
        {
            "user_id": user,
            "known_events": int(sequences.lengths[row]),
            "model_version": version,
            "source": row_source,
            "items": [{"item_id": item_ids[i - 1], "score": float(s)} for i, s in zip(best.tolist(), scores.tolist(), strict=True)],
        }
        for row, (user, ((best, scores), row_source)) in enumerate(zip(users, lists, strict=True))
    ]


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    for result in recommend(settings, args.user, settings.serve.top_k, args.checkpoint):
        print(json.dumps(result))
    return 0
