"""Paired intervals of two stream runs over their windows."""

from __future__ import annotations

import pytest

from consumers.evaluation.stream_intervals import paired_window_difference


def _report(hr: list[float], n: list[int]) -> dict:
    return {"prequential": {"by_window": [{"start": k, "end": k + 1, "hr@10": h, "n": c}
                                          for k, (h, c) in enumerate(zip(hr, n, strict=True))]}}


def test_difference_is_event_weighted_and_its_interval_covers_the_window_spread() -> None:
    run, base = _report([0.5, 0.2, 0.4, 0.3], [10, 30, 20, 40]), _report([0.4, 0.2, 0.1, 0.3], [10, 30, 20, 40])
    found = paired_window_difference(run, base, "hr@10")
    assert found.mean == pytest.approx((10 * 0.1 + 20 * 0.3) / 100)
    assert 0.0 <= found.low < found.mean < found.high <= 0.3  # windows differ by 0 .. 0.3
    same = paired_window_difference(run, run, "hr@10")
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)


def test_runs_of_other_events_are_not_paired() -> None:
    with pytest.raises(ValueError, match="same events"):
        paired_window_difference(_report([0.1, 0.2], [5, 5]), _report([0.1, 0.2], [5, 6]), "hr@10")
