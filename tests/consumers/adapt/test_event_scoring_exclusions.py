"""The full test-then-train rank leaves out the items the published lists leave out
(`serve.exclude_behaviours` in the user's window), and counts an excluded positive as a miss."""

from __future__ import annotations

import numpy as np
import torch

from casm_core.config import ModelConfig
from casm_core.metrics import rank_in_full
from casm_core.model import CASM
from casm_core.scoring import Scorer
from consumers.adapt.event_scoring import score_events

NUM_ITEMS = 30
BOUGHT = 2  # the behaviour index whose window items are excluded


def test_excluded_window_items_do_not_compete_and_an_excluded_positive_is_a_miss() -> None:
    torch.manual_seed(0)
    model = CASM(ModelConfig(hidden_dim=16, context_dim=8, ffn_dim=16, max_len=6, dropout=0.0), NUM_ITEMS, 3)
    scorer = Scorer(model, target_behaviour=3)
    stored_items = np.array([[0, 0, 3, 4, 9, 11]])
    stored_behaviours = np.array([[0, 0, 1, BOUGHT, BOUGHT, 1]])
    scores = scorer.score_all(stored_items, stored_behaviours).numpy()
    # The first event's item: the lowest-scored item, so both bought items (4, 9) rank above it.
    first = int(np.argmin(np.where(np.arange(NUM_ITEMS + 1) > 0, scores[0], np.inf)))
    # Two events of the user: `first` (not excluded), then item 9 (bought before: excluded).
    result = score_events(
        scorer, np.arange(2), stored_items, stored_behaviours, np.array([0, 0]), np.array([first, 9]),
        np.array([1, 1]), num_sampled=5, rng=np.random.default_rng(0), chunk=4, exclude_behaviours=[BOUGHT],
    )
    excluded = np.zeros_like(scores, dtype=bool)
    excluded[0, [4, 9]] = True
    assert result.rank_full[0] == rank_in_full(scores, np.array([first]), excluded)[0] == NUM_ITEMS - 3
    assert result.rank_full[1] == NUM_ITEMS + 1
