"""Paired intervals between two stream evaluations of the same log (`evaluate-stream` reports).

A report keeps the published lists' metrics per window of `live.window_events` events
(``prequential.by_window``: the window's mean and its count of scored target events), not per
event, so the paired difference of two runs is bootstrapped over windows: a replicate draws the
windows with replacement and takes, in both runs, the mean over the drawn windows' events (a
cluster bootstrap with the window as the cluster: `casm_core.bootstrap` with each window's events
as one group). Both runs must have scored the same events per window (the same log and batches:
the deterministic `--max` runs do). Windows are wider than users, so this interval is wider
than one over users would be.

    python -m consumers.evaluation.stream_intervals RUN_A RUN_B [--metric hr@10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from casm_core.bootstrap import Interval, interval

REPLICATES = 1_000  # as the offline reports
SEED = 0


def windows(report: dict, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(events scored [W], metric mean [W], NaN as 0 where a window scored none) of a report."""
    rows = report["prequential"]["by_window"]
    counts = np.array([row["n"] for row in rows], dtype=np.int64)
    values = np.nan_to_num(np.array([row[metric] if row[metric] is not None else np.nan for row in rows], float))
    return counts, values


def paired_window_difference(report: dict, baseline: dict, metric: str, replicates: int = REPLICATES,
                             seed: int = SEED) -> Interval:
    """Mean `metric` of `report`'s published lists minus `baseline`'s over the same events, with
    its 95 % bootstrap interval over windows."""
    counts, values = windows(report, metric)
    base_counts, base_values = windows(baseline, metric)
    if not np.array_equal(counts, base_counts):
        raise ValueError("the runs did not score the same events per window: not a paired comparison")
    groups = np.repeat(np.arange(counts.size), counts)  # each window's events, one group
    return interval(np.repeat(values - base_values, counts), replicates, seed, groups=groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="report folder (metrics.json) of the run")
    parser.add_argument("baseline", type=Path, help="report folder of the run it is compared with")
    parser.add_argument("--metric", action="append", default=None, help="hr@10, ndcg@10, mrr (repeatable)")
    args = parser.parse_args()
    run, base = (json.loads((folder / "metrics.json").read_text()) for folder in (args.run, args.baseline))
    for metric in args.metric or ["hr@10", "ndcg@10"]:
        found = paired_window_difference(run, base, metric)
        print(f"{args.run.name} - {args.baseline.name} {metric}: {found.mean:+.4f} "
              f"[{found.low:+.4f}, {found.high:+.4f}]{' *' if found.excludes_zero() else ''}")


if __name__ == "__main__":
    main()
