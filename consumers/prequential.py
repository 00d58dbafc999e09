"""Prequential scoring of what the live system published: for every target-behaviour event, was
its item in the top-K the user had been sent *before* that event (HR@K, NDCG@K, MRR)? Also the
freshness of recommendations (event produce time -> recommendation publish time).

Events and recommendations arrive from two topics in no global order. Events are therefore held
for `grace_ms` (of the clock of the data) before being scored, so a recommendation published just
before an event but delivered to us just after it is still taken into account.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ScoredEvent:
    """One scored target event: its time (ms), user, rank of its item in the last published list
    (None: not in it), that list's model version and source, and whether the user had none."""

    at_ms: int
    user: str
    rank: int | None
    model_version: str | None
    source: str | None
    cold: bool


@dataclass
class _Published:
    times: list[int] = field(default_factory=list)
    lists: list[tuple[list[str], str, str]] = field(default_factory=list)


class PrequentialScorer:
    """Feed `recommendation(...)` and `event(...)` in any order; `flush(...)` scores held events."""

    def __init__(
        self, target: str, k: int, grace_ms: int, freshness_edges_ms: list[float], history_per_user: int = 8
    ) -> None:
        self.target = target
        self.freshness_edges_ms = list(freshness_edges_ms)
        self.k = k
        self.grace_ms = grace_ms
        self.history_per_user = history_per_user
        self._published: dict[str, _Published] = defaultdict(_Published)
        self._held: list[tuple[int, int, str, str]] = []  # (at_ms, seq, user, item) min-heap
        self._seq = 0
        self.scored: list[ScoredEvent] = []
        self.freshness_ms: list[float] = []
        self.events_seen: dict[str, int] = defaultdict(int)
        self.latest_ms = 0

    def recommendation(
        self, user: str, items: list[str], at_ms: int, model_version: str, source: str,
        event_produced_ms: int | None = None,
    ) -> None:
        """A recommendation published at `at_ms` (its Kafka record time)."""
        published = self._published[user]
        index = bisect.bisect_right(published.times, at_ms)
        published.times.insert(index, at_ms)
        published.lists.insert(index, (items[: self.k], model_version, source))
        if len(published.times) > self.history_per_user:
            del published.times[0], published.lists[0]
        if event_produced_ms is not None and event_produced_ms >= 0:
            self.freshness_ms.append(max(0, at_ms - event_produced_ms))
        self.latest_ms = max(self.latest_ms, at_ms)

    def event(self, user: str, item: str, behaviour: str, at_ms: int) -> None:
        """A behaviour event produced at `at_ms`; target events are held, then scored."""
        self.events_seen[behaviour] += 1
        self.latest_ms = max(self.latest_ms, at_ms)
        if behaviour == self.target:
            heapq.heappush(self._held, (at_ms, self._seq, user, item))
            self._seq += 1

    def flush(self, now_ms: int | None = None) -> int:
        """Score held events older than `now_ms - grace_ms` (all of them when now_ms is None).
        Returns how many were scored."""
        limit = math.inf if now_ms is None else now_ms - self.grace_ms
        count = 0
        while self._held and self._held[0][0] <= limit:
            at_ms, _, user, item = heapq.heappop(self._held)
            self.scored.append(self._score(user, item, at_ms))
            count += 1
        return count

    def _score(self, user: str, item: str, at_ms: int) -> ScoredEvent:
        published = self._published.get(user)
        index = bisect.bisect_left(published.times, at_ms) if published else 0
        if not published or index == 0:
            return ScoredEvent(at_ms, user, None, None, None, cold=True)
        items, version, source = published.lists[index - 1]
        rank = items.index(item) if item in items else None
        return ScoredEvent(at_ms, user, rank, version, source, cold=False)

    def summary(self) -> dict[str, Any]:
        """HR@K, NDCG@K and MRR over warm target events (the user had a recommendation), the
        number of cold ones, and the freshness percentiles (ms)."""
        warm = [s for s in self.scored if not s.cold]
        ranks = np.array([s.rank if s.rank is not None else self.k for s in warm], dtype=float)
        hits = ranks < self.k
        result: dict[str, Any] = {
            "target_events": len(self.scored),
            "scored": len(warm),
            "cold": len(self.scored) - len(warm),
            f"hr@{self.k}": float(hits.mean()) if warm else float("nan"),
            f"ndcg@{self.k}": float(np.where(hits, 1 / np.log2(ranks + 2), 0).mean()) if warm else float("nan"),
            "mrr": float(np.where(hits, 1 / (ranks + 1), 0).mean()) if warm else float("nan"),
            "by_source": {
                source: float(np.mean([s.rank is not None for s in warm if s.source == source]))
                for source in sorted({s.source for s in warm})
            },
        }
        result.update(freshness_summary(self.freshness_ms, self.freshness_edges_ms))
        return result


def freshness_summary(values_ms: list[float], edges_ms: list[float]) -> dict[str, Any]:
    """Count, p50/p90/p99/max and a histogram (bins between `edges_ms`, plus overflow) of
    freshness values (ms)."""
    if not values_ms:
        return {"freshness_count": 0, "freshness_histogram": []}
    values = np.asarray(values_ms, dtype=float)
    counts, _ = np.histogram(values, bins=[*edges_ms, np.inf])
    labels = [f"{a:g}-{b:g}" for a, b in zip(edges_ms[:-1], edges_ms[1:], strict=True)] + [f">={edges_ms[-1]:g}"]
    return {
        "freshness_count": int(values.size),
        "freshness_p50_ms": float(np.percentile(values, 50)),
        "freshness_p90_ms": float(np.percentile(values, 90)),
        "freshness_p99_ms": float(np.percentile(values, 99)),
        "freshness_max_ms": float(values.max()),
        "freshness_histogram": [[label, int(n)] for label, n in zip(labels, counts, strict=True)],
    }
