"""The serving copy of the model: the weights of one version and a Scorer over them, swapped as
a whole when a new version arrives (readers take `scorer` once and keep a consistent model)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from casm_core.model import CASM
from casm_core.scoring import Scorer
from consumers.settings import CasmSettings


class ServingModel:
    """The current (version, Scorer) pair; the Scorer is None until the first version. Threads
    read `current` once to get a consistent pair."""

    def __init__(self, settings: CasmSettings) -> None:
        self.model_cfg = settings.model
        self.target = settings.behaviours.target_index()
        self.current: tuple[int, Scorer | None] = (0, None)

    def load(self, version: int, weights: dict[str, np.ndarray], num_items: int, behaviours: Sequence[str]) -> None:
        """Build `version` aside, then swap it in with one assignment."""
        model = CASM(self.model_cfg, num_items, len(behaviours))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        self.current = (version, Scorer(model, self.target))

    @property
    def version(self) -> int:
        return self.current[0]

    @property
    def scorer(self) -> Scorer | None:
        return self.current[1]

    @property
    def num_items(self) -> int:
        scorer = self.current[1]
        return 0 if scorer is None else scorer.num_items
