"""Test-then-train scoring of incoming events: before a batch is applied (and long before the model
trains on it), rank each event's item for its user with the model of that moment.

Each event is ranked after exactly the events its user had before it (the stored sequence plus the
user's earlier events of the same batch), the way the service would have scored the user just then:
one pass of the model per scored event. The caller picks which events to score (the service scores
every target event and a share of the others) to bound the cost.

Two ranks per event: among every item the model knows (full), and among `num_sampled` items not in
the user's window (sampled, the paper's protocol). Items the model does not know yet get no rank
(they cannot be recommended); nor do a user's first events (cold). These ranks feed the drift
detectors and the scores topic that stream evaluation reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from casm_core.metrics import rank_among, rank_in_full
from casm_core.sampling import NegativeSampler, SequenceCorpus
from casm_core.scoring import Scorer, items_with_behaviours

NO_RANK = -1


@dataclass
class EventScores:
    """Per scored event (aligned arrays): row in the batch, full and sampled rank (NO_RANK: item
    unknown to the model, or cold), whether the user had no history (cold)."""

    rows: np.ndarray
    rank_full: np.ndarray
    rank_sampled: np.ndarray
    cold: np.ndarray
    num_items: int

    def __len__(self) -> int:
        return len(self.rows)


def _ranks(
    scores: torch.Tensor,
    positives: np.ndarray,
    windows: np.ndarray,
    num_sampled: int,
    sampler: NegativeSampler,
    rng: np.random.Generator,
    excluded: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Full and sampled ranks (`casm_core.metrics`, on the scores' device) of `positives` [n]
    given scores [n, N + 1]; sampled negatives avoid the items of each event's window [n, W] and
    its own item. The full rank leaves out the items of `excluded` [n, M] (0: none) as the
    published lists do; a positive among them is a miss (rank N + 1)."""
    positive_t = torch.as_tensor(positives, device=scores.device)
    mask = None
    if excluded is not None:
        known = np.where(excluded < scores.shape[1], excluded, 0)  # items newer than the model: not scored
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        mask.scatter_(1, torch.as_tensor(known, device=scores.device), True)
        mask[:, 0] = False
    full = rank_in_full(scores, positive_t, mask)
    if mask is not None:
        full = torch.where(mask.gather(1, positive_t[:, None]).squeeze(1), torch.full_like(full, scores.shape[1]), full)
    stride = sampler.num_items + 1
    event = np.arange(positives.size)[:, None]
    touched = np.unique(np.concatenate([(event * stride + windows).ravel(), event[:, 0] * stride + positives]))
    negatives = sampler.sample(rng, (positives.size, num_sampled), touched, stride)
    candidates = torch.as_tensor(np.concatenate([positives[:, None], negatives], axis=1), device=scores.device)
    return full.cpu().numpy(), rank_among(scores.gather(1, candidates)).cpu().numpy()


def score_events(
    scorer: Scorer,
    rows: np.ndarray,
    stored_items: np.ndarray,
    stored_behaviours: np.ndarray,
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    behaviour_codes: np.ndarray,
    num_sampled: int,
    rng: np.random.Generator,
    chunk: int,
    exclude_behaviours: Sequence[int] = (),
) -> EventScores:
    """Rank batch rows `rows` test-then-train.

    stored_items / stored_behaviours: [U, W] left-padded sequences (W = the model's max_len) of the
    batch's distinct users before the batch; user_codes [n]: each batch row's user (0..U-1);
    item_codes / behaviour_codes [n]: each batch row's item and behaviour index (0: unknown).
    Scores against every item are computed `chunk` events at a time (memory: chunk x items).
    exclude_behaviours: behaviour indices whose window items the full rank leaves out (the
    published lists' `serve.exclude_behaviours`), so both measure the same lists.
    """
    width = stored_items.shape[1]
    num_users = stored_items.shape[0]
    stored = SequenceCorpus.from_padded(stored_items, stored_behaviours)
    corpus = SequenceCorpus.from_events(
        np.concatenate([np.repeat(np.arange(num_users), stored.lengths), user_codes]),
        np.concatenate([stored.items, item_codes]),
        np.concatenate([stored.behaviours, behaviour_codes]),
        num_users,
    )
    # Position of each batch row in its user's combined sequence.
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
    known = np.flatnonzero((item_codes[rows] > 0) & (item_codes[rows] <= num_items) & ~cold)
    sampler = NegativeSampler(num_items)
    for start in range(0, known.size, chunk):
        part = known[start : start + chunk]
        batch_rows = rows[part]
        items, behaviours = corpus.windows(user_codes[batch_rows], positions[batch_rows], width)
        excluded = items_with_behaviours(items, behaviours, list(exclude_behaviours)) if exclude_behaviours else None
        rank_full[part], rank_sampled[part] = _ranks(
            scorer.score_all(items, behaviours), item_codes[batch_rows], items, num_sampled, sampler, rng, excluded
        )
    return EventScores(rows=rows, rank_full=rank_full, rank_sampled=rank_sampled, cold=cold, num_items=num_items)
