"""Negatives drawn from the user's own earlier events (for the repeat-aware score)."""

from __future__ import annotations

import numpy as np

from casm_core.sampling import window_negatives


def test_window_negatives_come_from_earlier_events_and_never_the_positive() -> None:
    rng = np.random.default_rng(0)
    inputs = np.array([[0, 0, 4, 5, 4, 6], [1, 2, 3, 4, 5, 6]])
    targets = np.array([[0, 0, 5, 4, 6, 7], [2, 3, 4, 5, 6, 1]])
    drawn = window_negatives(inputs, targets, count=50, rng=rng)
    assert drawn.shape == (2, 6, 50)
    assert (drawn[0, :2] == 0).all()  # padding positions get none
    for row in range(2):
        for t in range(6):
            values = set(drawn[row, t].tolist()) - {0}
            assert values <= set(inputs[row, : t + 1].tolist()) - {0}
            assert targets[row, t] not in values
    # Every earlier item other than the positive is drawn some time.
    assert set(drawn[1, 5].tolist()) - {0} == {2, 3, 4, 5, 6}
    assert set(drawn[0, 2].tolist()) == {4}
