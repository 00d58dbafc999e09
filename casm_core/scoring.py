"""Scoring users against every known item, and top-K with optional exclusions."""

from __future__ import annotations

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
        with torch.inference_mode():
            self.candidates = model.candidate_matrix(target_behaviour)  # [N + 1, d]

    @property
    def num_items(self) -> int:
        return self.candidates.shape[0] - 1

    def _tensor(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def score_all(self, items: np.ndarray | torch.Tensor, behaviours: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores [B, num_items + 1] of every item after sequences items/behaviours [B, W];
        column 0 (padding) is -inf. Items unknown to the model are clipped to padding."""
        items_t = self._tensor(items)
        items_t = torch.where(items_t > self.num_items, torch.zeros_like(items_t), items_t)
        users = self.model.user_representation(items_t, self._tensor(behaviours))
        scores = users @ self.candidates.T
        scores[:, 0] = -torch.inf
        return scores

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
        scores = self.score_all(items, behaviours)
        if exclude is not None and exclude.size:
            excluded = self._tensor(exclude).clamp(max=self.num_items)
            scores.scatter_(1, excluded, -torch.inf)
        k = min(k, self.num_items)
        best = torch.topk(scores, k, dim=1)
        return best.values.float().cpu().numpy(), best.indices.cpu().numpy()
