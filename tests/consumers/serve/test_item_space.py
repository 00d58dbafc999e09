"""Serving a version trained elsewhere: the version's item indices, the store's other items after."""

from __future__ import annotations

import numpy as np

from consumers.serve.item_space import ItemSpace


def test_store_indices_map_to_the_versions_and_new_items_follow() -> None:
    space = ItemSpace(["x", "y", "z"])  # the trainer's numbering
    space.extend(["z", "new1", "x"])  # this store's numbering: z=1, new1=2, x=3
    assert space.items(np.array([[0, 1, 2, 3]])).tolist() == [[0, 3, 4, 1]]
    assert space.ids == ["x", "y", "z", "new1"]
    space.extend(["z", "new1", "x", "y", "new2"])  # the store grew
    assert space.local_to_space.tolist() == [0, 3, 4, 1, 2, 5]
    counts = space.counts(np.array([0, 10, 20, 30, 40, 50]))
    assert counts.tolist() == [0, 30, 40, 10, 20, 50]
