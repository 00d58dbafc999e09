"""The serving copy of the model: the weights of one version and a Scorer over them, swapped as
a whole when a new version arrives (readers take `scorer` once and keep a consistent model)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from casm_core.model import CASM
from casm_core.scoring import Scorer
from consumers.settings import CasmSettings


class ServingModel:
    """The current (version, Scorer) pair; the Scorer is None until the first version. Threads
    read `current` (or `snapshot`) once to get a consistent pair.

    A version trained in this process indexes items as this process's store does; one loaded from
    the models topic (scale-out) comes with its own item vocabulary (`snapshot`'s third part,
    None otherwise), which serving translates to (`consumers.serve.item_space`)."""

    def __init__(self, settings: CasmSettings) -> None:
        self.model_cfg = settings.model
        self.target = settings.behaviours.target_index()
        self._state: tuple[int, Scorer | None, list[str] | None] = (0, None, None)
        self.loaded_at: float | None = None  # unix s of the last swap
        self.published_at: float | None = None  # unix s the loaded version was published (models topic)

    def load(self, version: int, weights: dict[str, np.ndarray], num_items: int, behaviours: Sequence[str], *,
             alpha: Mapping[str, float] | None = None, item_ids: Sequence[str] | None = None,
             published_at: float | None = None) -> None:
        """Build `version` aside, then swap it in with one assignment. `item_ids`: the version's
        item vocabulary in index order when it was trained elsewhere; `alpha` is what it was
        trained with (kept by subclasses that publish it)."""
        model = CASM(self.model_cfg, num_items, len(behaviours))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        self._state = (version, Scorer(model, self.target), None if item_ids is None else list(item_ids))
        self.loaded_at, self.published_at = time.time(), published_at

    @property
    def current(self) -> tuple[int, Scorer | None]:
        return self._state[:2]

    @property
    def snapshot(self) -> tuple[int, Scorer | None, list[str] | None]:
        """(version, scorer, the version's item vocabulary or None) as one consistent triple."""
        return self._state

    @property
    def version(self) -> int:
        return self._state[0]

    @property
    def scorer(self) -> Scorer | None:
        return self.current[1]

    @property
    def num_items(self) -> int:
        scorer = self._state[1]
        return 0 if scorer is None else scorer.num_items
