"""The one home of ranks and metrics (`casm_core.metrics`) serves numpy and torch alike, and the
metrics of published lists (ranks within k, None: not in the list)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from casm_core.metrics import metrics_of_lists, rank_among, rank_in_full, summarize


def test_ranks_agree_on_numpy_and_torch_with_ties_and_exclusions() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(6, 9)).astype(np.float32)  # small range: many ties
    scores[:, 0] = -np.inf
    positives = rng.integers(1, 9, size=6)
    excluded = rng.random((6, 9)) < 0.3
    torch_scores = torch.as_tensor(scores)
    among_np, among_t = rank_among(scores, 2), rank_among(torch_scores, 2)
    full_np = rank_in_full(scores, positives, excluded)
    full_t = rank_in_full(torch_scores, torch.as_tensor(positives), torch.as_tensor(excluded))
    assert isinstance(among_t, torch.Tensor) and among_t.dtype == torch.int64
    assert among_np.dtype == np.int64 and full_np.dtype == np.int64
    np.testing.assert_array_equal(among_np, among_t.numpy())
    np.testing.assert_array_equal(full_np, full_t.numpy())
    for row in range(6):  # by the definition: competitors scoring >= the positive, ties against
        competes = np.ones(9, bool)
        competes[[0, positives[row]]] = False
        competes &= ~excluded[row]
        assert full_np[row] == int((scores[row][competes] >= scores[row, positives[row]]).sum())
        others = np.delete(scores[row], 2)
        assert among_np[row] == int((others >= scores[row, 2]).sum())


def test_metrics_of_lists_count_absent_items_as_misses_and_cut_mrr_at_k() -> None:
    result = metrics_of_lists([0, 2, None, 7], k=5)
    assert result["n"] == 4
    assert result["hr@5"] == pytest.approx(0.5)
    assert result["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert result["mrr"] == pytest.approx((1 + 1 / 3) / 4)  # rank 7 is beyond the list: 0
    # A full ranking's MRR (summarize) credits rank 7; the lists' does not.
    assert summarize(np.array([0, 2, 7]), [5])["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 8) / 3)
    empty = metrics_of_lists([], k=5)
    assert empty["n"] == 0 and math.isnan(empty["hr@5"]) and math.isnan(empty["mrr"])
