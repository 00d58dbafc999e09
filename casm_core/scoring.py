"""Scoring users against every known item, and top-K with optional exclusions."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch

from casm_core.model import CASM


def items_with_behaviours(items: np.ndarray, behaviours: np.ndarray, chosen: Iterable[int]) -> np.ndarray:
    """The items [B, W] whose event behaviour is in `chosen` (others set to 0): the exclusion list
    for "do not recommend what the user already bought"."""
    keep = np.isin(behaviours, np.fromiter(chosen, dtype=np.int64))
    return np.where(keep, items, 0)


class Scorer:
    """Scores with a model in eval mode; the candidate matrix (every item embedded with the
    target behaviour) is computed once, so build a new Scorer when the weights change."""

    def __init__(self, model: CASM, target_behaviour: int) -> None:
        self.model = model.eval()
        self.device = model.item_embedding.weight.device
        self.target = target_behaviour
        self.catalogue = model.num_items  # items scored; more with `with_catalogue`
        with torch.inference_mode():
            self.candidates = model.candidate_matrix(target_behaviour)  # [N + 1, d]

    @property
    def num_items(self) -> int:
        return self.candidates.shape[0] - 1

    def _tensor(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def score_all(self, items: np.ndarray | torch.Tensor, behaviours: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores [B, catalogue + 1] of every item after sequences items/behaviours [B, W];
        column 0 (padding) is -inf. Items unknown to the model are padding to its encoder (see
        `with_catalogue` for how they are scored)."""
        items_t = self._known(items)
        window = None
        if self.catalogue > self.num_items:
            window = self._tensor(items)
            window = torch.where(window > self.catalogue, torch.zeros_like(window), window)
        scores = self.model.full_logits(
            items_t, self._tensor(behaviours), self.target, self.candidates, window, self.catalogue + 1
        )
        scores[:, 0] = -torch.inf
        return scores

    def with_catalogue(self, num_items: int) -> Scorer:
        """This scorer over `num_items` items (a live store's vocabulary, which grows before the
        model learns its new items): `score_all` then gives [B, num_items + 1], window items the
        model does not know yet scored by their repeat term, other unknown items -inf. Shares the
        model and candidate matrix (no copy)."""
        view = copy.copy(self)
        view.catalogue = max(num_items, self.num_items)
        return view

    def _known(self, items: np.ndarray | torch.Tensor) -> torch.Tensor:
        items_t = self._tensor(items)
        return torch.where(items_t > self.num_items, torch.zeros_like(items_t), items_t)

    @torch.inference_mode()
    def score_candidates(
        self, items: np.ndarray, behaviours: np.ndarray, candidates: np.ndarray
    ) -> torch.Tensor:
        """Scores [B, C] of candidates int64 [B, C] after sequences items/behaviours [B, W],
        through the training path (`CASM.candidate_logits` at the last position); equal to the
        matching columns of `score_all`."""
        items_t, behaviours_t = self._known(items), self._tensor(behaviours)
        hidden = self.model.encode(items_t, behaviours_t)
        target = torch.full(items_t.shape, self.target, dtype=torch.int64, device=self.device)
        candidates_t = self._tensor(candidates)[:, None, :].expand(-1, items_t.shape[1], -1)
        return self.model.candidate_logits(hidden, items_t, behaviours_t, candidates_t, target)[:, -1, :]

    @torch.inference_mode()
    def top_k(
        self,
        items: np.ndarray,
        behaviours: np.ndarray,
        k: int,
        exclude: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Best `k` items per sequence: (scores float32 [B, k], item indices int64 [B, k]), best
        first. `exclude` [B, M] lists item indices (0 = none) never to return for that row."""
        return top_k_of_scores(self.score_all(items, behaviours), k, exclude)


def top_k_of_scores(
    scores: np.ndarray | torch.Tensor, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best `k` columns per row of scores [B, num_items + 1] (column 0 is padding): (scores
    float32 [B, k], item indices int64 [B, k]), best first. `exclude` [B, M] lists item indices
    (0 = none) never to return for that row. The one top-K of every recommender (model and
    baselines), offline and live. `scores` is overwritten (excluded columns set to -inf)."""
    scores = torch.as_tensor(scores)
    num_items = scores.shape[1] - 1
    if exclude is not None and exclude.size:
        excluded = torch.as_tensor(exclude, dtype=torch.int64, device=scores.device)
        # Items beyond the scores (newer than the model) cannot be returned anyway: padding.
        excluded = torch.where(excluded > num_items, torch.zeros_like(excluded), excluded)
        scores.scatter_(1, excluded, -torch.inf)
    scores[:, 0] = -torch.inf
    best = torch.topk(scores, min(k, num_items), dim=1)
    return best.values.float().cpu().numpy(), best.indices.cpu().numpy()
