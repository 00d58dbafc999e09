"""Test-then-train scoring of incoming events: before a batch is applied (and long before the model
trains on it), rank each event's item for its user with the model of that moment.

Each event is ranked after exactly the events the user had before it: the stored sequence plus the
user's earlier events of the same batch. Two ranks per event: among every item the model knows
(full), and among `num_sampled` items the user has not touched in the sequence (sampled, the
paper's protocol). Items the model does not know yet get no rank (they cannot be recommended).
These ranks feed the drift detectors and the `scores` topic that stream evaluation reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from casm_core.metrics import rank_among, rank_in_full
from casm_core.sampling import NegativeSampler, SequenceCorpus, padded_item_keys
from casm_core.scoring import Scorer

NO_RANK = -1


@dataclass
class EventScores:
    """Per scored event (aligned arrays): row in the batch, behaviour name, full and sampled rank
    (NO_RANK: item unknown to the model), whether the user had no history (cold)."""

    rows: np.ndarray
    behaviours: list[str]
    rank_full: np.ndarray
    rank_sampled: np.ndarray
    cold: np.ndarray
    num_items: int

    def __len__(self) -> int:
        return len(self.rows)


def score_events(
    scorer: Scorer,
    events: pa.Table,
    rows: np.ndarray,
    stored_items: np.ndarray,
    stored_behaviours: np.ndarray,
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    behaviour_codes: np.ndarray,
    num_sampled: int,
    rng: np.random.Generator,
    batch_size: int,
) -> EventScores:
    """Rank events `rows` of `events` test-then-train.

    stored_items / stored_behaviours: [U, W] left-padded sequences of the batch's distinct users
    before the batch; user_codes [n]: each batch row's user (0..U-1); item_codes / behaviour_codes
    [n]: each batch row's item and behaviour index (0 where unknown to the store).
    """
    width = stored_items.shape[1]
    num_users = stored_items.shape[0]
    stored = SequenceCorpus.from_padded(stored_items, stored_behaviours)
    # One corpus of [stored events, then the batch's events] per user, in arrival order.
    all_users = np.concatenate([np.repeat(np.arange(num_users), stored.lengths), user_codes])
    all_items = np.concatenate([stored.items, item_codes])
    all_behaviours = np.concatenate([stored.behaviours, behaviour_codes])
    corpus = SequenceCorpus.from_events(all_users, all_items, all_behaviours, num_users)
    # Position of each batch row within its user's combined sequence.
    order = np.argsort(user_codes, kind="stable")
    first = np.searchsorted(user_codes[order], np.arange(num_users))
    within = np.empty(len(user_codes), dtype=np.int64)
    within[order] = np.arange(len(user_codes)) - first[user_codes[order]]
    positions = stored.lengths[user_codes] + within

    rows = np.asarray(rows, dtype=np.int64)
    num_items = scorer.num_items
    rank_full = np.full(rows.size, NO_RANK, dtype=np.int64)
    rank_sampled = np.full(rows.size, NO_RANK, dtype=np.int64)
    cold = positions[rows] == 0
    known = (item_codes[rows] > 0) & (item_codes[rows] <= num_items) & ~cold
    sampler = NegativeSampler(num_items)
    for start in range(0, rows.size, batch_size):
        part = np.arange(start, min(start + batch_size, rows.size))
        part = part[known[part]]
        if part.size == 0:
            continue
        batch_rows = rows[part]
        items, behaviours = corpus.windows(user_codes[batch_rows], positions[batch_rows], width)
        positives = item_codes[batch_rows]
        scores = scorer.score_all(items, behaviours)
        scores = scores.float().cpu().numpy() if torch.is_tensor(scores) else scores
        rank_full[part] = rank_in_full(scores, positives)
        stride = num_items + 1
        excluded = np.union1d(padded_item_keys(items, stride), np.arange(part.size) * stride + positives)
        negatives = sampler.sample(rng, (part.size, num_sampled), excluded, stride)
        candidates = np.concatenate([positives[:, None], negatives], axis=1)
        rank_sampled[part] = rank_among(np.take_along_axis(scores, candidates, axis=1))
    names = events.column("behavior").to_pylist()
    return EventScores(
        rows=rows,
        behaviours=[names[r] for r in rows.tolist()],
        rank_full=rank_full,
        rank_sampled=rank_sampled,
        cold=cold,
        num_items=num_items,
    )
