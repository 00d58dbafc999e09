"""``casm recommend --user U``: a user's current top-K from the state store and the newest model,
for debugging. Reads the store read-only, so it runs beside a stopped service (DuckDB lets one
process write a file; while `casm serve` runs, read its `recommendations` topic instead)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from casm_core.checkpoint import load_checkpoint
from casm_core.scoring import Scorer, items_with_behaviours
from consumers.service import open_store
from consumers.settings import CasmSettings

NAME = "recommend"
HELP = "Print a user's current top-K (state store + newest model checkpoint)."

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", required=True, action="append", help="user id (repeatable)")
    parser.add_argument("--k", type=int, default=None, help="items per user [serve.top_k]")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model checkpoint [newest registered]")


def recommend(settings: CasmSettings, users: list[str], k: int, checkpoint: Path | None = None) -> list[dict]:
    """Top-`k` of each user as plain dicts (source "model", or "popularity" when the user has no
    history or there is no model)."""
    with open_store(settings, read_only=True) as store:
        if checkpoint is None:
            latest = store.latest_model()
            checkpoint = Path(latest["checkpoint_path"]) if latest and latest["checkpoint_path"] else None
        item_ids = store.item_ids()
        sequences = store.sequences(users, width=settings.model.max_len)
        counts = store.item_popularity(settings.serve.popularity_behaviours or None)
        names = store.behaviour_names()
    popular = (np.argsort(-counts[1:], kind="stable")[:k] + 1).tolist()
    scorer = version = None
    if checkpoint is not None and checkpoint.exists():
        trainer, metadata = load_checkpoint(checkpoint)
        if trainer.items.ids() != item_ids[: len(trainer.items)]:
            raise SystemExit(f"{checkpoint} numbers items differently from the store; it is not this store's model")
        scorer, version = Scorer(trainer.model, trainer.behaviours.target_index()), metadata.get("version")
    results = []
    for row, user in enumerate(users):
        if scorer is not None and sequences.lengths[row] > 0:
            exclude = None
            if settings.serve.exclude_behaviours:
                chosen = [names.index(b) + 1 for b in settings.serve.exclude_behaviours if b in names]
                exclude = items_with_behaviours(sequences.items[row : row + 1], sequences.behaviours[row : row + 1], chosen)
            scores, best = scorer.top_k(sequences.items[row : row + 1], sequences.behaviours[row : row + 1], k, exclude)
            finite = np.isfinite(scores[0])
            items = [{"item_id": item_ids[i - 1], "score": float(s)} for i, s in zip(best[0][finite], scores[0][finite], strict=True)]
            source = "model"
        else:
            items = [{"item_id": item_ids[i - 1], "score": float(counts[i])} for i in popular]
            source = "popularity"
        results.append({
            "user_id": user,
            "known_events": int(sequences.lengths[row]),
            "model_version": version,
            "source": source,
            "items": items,
        })
    return results


def run(args: argparse.Namespace, settings: CasmSettings) -> int:
    k = args.k or settings.serve.top_k
    for result in recommend(settings, args.user, k, args.checkpoint):
        print(json.dumps(result))
    return 0
