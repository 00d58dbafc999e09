"""Prequential scoring of what the live system published: for every event, was its item in the
top-K the user had been sent *before* that event? HR@K, NDCG@K and MRR, for the target behaviour
(the headline), per behaviour, per window of event time, and for cold users (no recommendation
yet) apart. Also the freshness of recommendations (event produce time -> publish time).

"Before" has two clocks:

- ``wall``: the recommendation's Kafka record time precedes the event's produce time: what a user
  of a live system would have seen (stale lists count against it). Events are held `grace_ms` so a
  list published just before an event but delivered to us just after it still counts. Use it for
  paced streams (`casm demo`).
- ``event_order``: the list reflects only events of the user that come before this one (its
  `event_offset` is lower in the user's partition): what the system had computed for the user
  at that point of the stream, whatever the replay speed. Use it for replays at full speed.
  An event is scored once a list reflecting it (or a later event) arrived, or at the end.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from casm_core.metrics import metrics_of_lists

Clock = Literal["wall", "event_order"]

LISTS_PER_USER = 8
"""Default of the lists kept per user (the newest) to score the user's later events against;
`run_live` passes the setting `live.lists_per_user`."""


@dataclass
class ScoredEvent:
    """One scored event: its position in the replayed stream, whose, which behaviour, the rank of
    its item in the last list sent before it (None: not in it), that list's model version and
    source, and whether the user had no list yet (cold)."""

    position: int
    history: int
    user: str
    behaviour: str
    rank: int | None
    model_version: str | None
    source: str | None
    cold: bool


@dataclass
class _Lists:
    at: list[float] = field(default_factory=list)
    lists: list[tuple[list[str], str, str]] = field(default_factory=list)


class PrequentialScorer:
    """Feed `recommendation(...)` and `event(...)` in any order; `flush(...)` scores what can be."""

    def __init__(
        self,
        target: str,
        k: int,
        freshness_edges_ms: list[float],
        clock: Clock = "wall",
        grace_ms: int = 0,
        history_per_user: int = LISTS_PER_USER,
    ) -> None:
        self.target = target
        self.k = k
        self.clock = clock
        self.grace_ms = grace_ms
        self.freshness_edges_ms = list(freshness_edges_ms)
        self.history_per_user = history_per_user
        self._lists: dict[str, _Lists] = defaultdict(_Lists)
        self._held: list[tuple] = []  # wall clock: heap by produce time
        self._waiting: dict[str, list[tuple]] = defaultdict(list)  # event order: per user, by offset
        self._seq = 0
        self.scored: list[ScoredEvent] = []
        self.freshness_ms: list[float] = []
        self.target_hits = 0  # running counts for progress displays
        self.target_warm = 0
        self.events_seen: dict[str, int] = defaultdict(int)

    def recommendation(
        self, user: str, items: list[str], at: float, model_version: str, source: str,
        published_ms: int | None = None, event_produced_ms: int | None = None,
    ) -> None:
        """A list sent to `user`. `at`: its record time (ms) with the wall clock, the offset of
        the newest event it reflects with event order (-1: none)."""
        lists = self._lists[user]
        index = bisect.bisect_right(lists.at, at)
        lists.at.insert(index, at)
        lists.lists.insert(index, (items[: self.k], model_version, source))
        if len(lists.at) > self.history_per_user:
            del lists.at[0], lists.lists[0]
        if published_ms is not None and event_produced_ms is not None and event_produced_ms >= 0:
            self.freshness_ms.append(max(0, published_ms - event_produced_ms))
        if self.clock == "event_order":
            waiting = self._waiting.get(user)
            while waiting and waiting[0][0] <= at:
                offset, _, item, behaviour, position, history = heapq.heappop(waiting)
                self._score(user, item, behaviour, offset, position, history)

    def event(self, user: str, item: str, behaviour: str, at: float, position: int, history: int = 0) -> None:
        """An event of `user`. `at`: its produce time (ms) with the wall clock, its offset with
        event order; `position`: its index in the replayed stream, for windows; `history`: the
        user's events before it."""
        self.events_seen[behaviour] += 1
        if self.clock == "wall":
            heapq.heappush(self._held, (at, self._seq, user, item, behaviour, position, history))
        else:
            heapq.heappush(self._waiting[user], (at, self._seq, item, behaviour, position, history))
        self._seq += 1

    def flush(self, now_ms: float | None = None) -> int:
        """Score held events: with the wall clock those older than `now_ms - grace_ms`; at the end
        (now_ms None) every event still held. Returns how many were scored."""
        before = len(self.scored)
        limit = math.inf if now_ms is None else now_ms - self.grace_ms
        while self._held and self._held[0][0] <= limit:
            at, _, user, item, behaviour, position, history = heapq.heappop(self._held)
            self._score(user, item, behaviour, at, position, history)
        if now_ms is None:
            for user, waiting in self._waiting.items():
                while waiting:
                    at, _, item, behaviour, position, history = heapq.heappop(waiting)
                    self._score(user, item, behaviour, at, position, history)
        return len(self.scored) - before

    def _score(self, user: str, item: str, behaviour: str, at: float, position: int, history: int) -> None:
        lists = self._lists.get(user)
        index = bisect.bisect_left(lists.at, at) if lists else 0
        if not lists or index == 0:
            self.scored.append(ScoredEvent(position, history, user, behaviour, None, None, None, cold=True))
            return
        items, version, source = lists.lists[index - 1]
        rank = items.index(item) if item in items else None
        self.scored.append(ScoredEvent(position, history, user, behaviour, rank, version, source, cold=False))
        if behaviour == self.target:
            self.target_warm += 1
            self.target_hits += rank is not None

    def running(self, recent: int) -> dict[str, float]:
        """Cheap progress figures: HR@K of warm target events so far, freshness p50/p99 (ms) of
        the last `recent` lists."""
        fresh = np.asarray(self.freshness_ms[-recent:], dtype=float)
        return {
            f"hr@{self.k}": self.target_hits / self.target_warm if self.target_warm else float("nan"),
            "freshness_p50_ms": float(np.percentile(fresh, 50)) if fresh.size else float("nan"),
            "freshness_p99_ms": float(np.percentile(fresh, 99)) if fresh.size else float("nan"),
        }

    def summary(self, window_events: int = 0) -> dict[str, Any]:
        """Metrics of warm target events (headline), per behaviour, by source, per window of
        `window_events` stream positions, the cold count, and freshness."""
        warm_target = [s for s in self.scored if s.behaviour == self.target and not s.cold]
        result: dict[str, Any] = {
            "clock": self.clock,
            "target_events": sum(1 for s in self.scored if s.behaviour == self.target),
            "scored": len(warm_target),
            "cold": sum(1 for s in self.scored if s.behaviour == self.target and s.cold),
            **{k: v for k, v in metrics_of_lists([s.rank for s in warm_target], self.k).items() if k != "n"},
            "by_behaviour": {
                b: metrics_of_lists([s.rank for s in self.scored if s.behaviour == b and not s.cold], self.k)
                for b in sorted(self.events_seen)
            },
            "by_source": {
                source: metrics_of_lists([s.rank for s in warm_target if s.source == source], self.k)
                for source in sorted({s.source for s in warm_target})
            },
        }
        if window_events and warm_target:
            by_window: dict[int, list[int | None]] = defaultdict(list)
            for s in warm_target:
                by_window[s.position // window_events].append(s.rank)
            result["by_window"] = [
                {"start": w * window_events, "end": (w + 1) * window_events, **metrics_of_lists(ranks, self.k)}
                for w, ranks in sorted(by_window.items())
            ]
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
