"""The published HR@K of `casm serve`: whether the lists this service published were hit by the
users' later target events, beside the same rate of the current most-popular top-K.

The publisher records each user's newest *acknowledged* list (`published`, producer I/O thread);
the apply stage asks, for every applied target-behaviour event, whether its item is in that
user's last list (`observe`, apply thread): a hit or a miss. Users with no list yet are "cold"
and not counted. For the same counted events it also checks the most-popular top-K
(`set_popular`, refreshed whenever the publisher recounts popularity), so the dashboard shows
popularity's hit rate beside the service's. Memory is bounded: at most `max_users` lists (the
least recently published dropped first) and one top-K set. One lock: every method may be called
from any thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HitTotals:
    """Counts since the start of the run (target events of users with a list, and of the others)."""

    hits: int = 0  # the event's item was in the user's last published list
    misses: int = 0  # it was not
    cold: int = 0  # the user had no published list yet (not counted in the rate)
    popular_hits: int = 0  # of hits + misses, the item was in the most-popular top-K at that moment

    @property
    def counted(self) -> int:
        """Events the hit rates are over (hits + misses)."""
        return self.hits + self.misses


class PublishedHits:
    """Each user's newest acknowledged list (bounded LRU) and the hit counts of target events."""

    def __init__(self, max_users: int) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be >= 1, not {max_users}")
        self.max_users = max_users
        self._lock = threading.Lock()
        self._lists: OrderedDict[str, tuple[float, frozenset[str]]] = OrderedDict()  # user -> (at, items)
        self._popular: frozenset[str] = frozenset()
        self._hits = self._misses = self._cold = self._popular_hits = 0

    def published(self, user: str, items: Sequence[str], at: float) -> None:
        """`user`'s list of `items`, generated at unix time `at` (s), was acknowledged. A list
        acknowledged after a newer one of the same user is ignored."""
        with self._lock:
            known = self._lists.get(user)
            if known is not None and known[0] > at:
                return
            self._lists[user] = (at, frozenset(items))
            self._lists.move_to_end(user)
            while len(self._lists) > self.max_users:
                self._lists.popitem(last=False)

    def set_popular(self, items: Iterable[str]) -> None:
        """The current most-popular top-K item ids."""
        popular = frozenset(items)
        with self._lock:
            self._popular = popular

    def observe(self, users: Sequence[str], items: Sequence[str]) -> None:
        """Target events, aligned `users` and `items`, applied now (before the lists they cause)."""
        with self._lock:
            for user, item in zip(users, items, strict=True):
                known = self._lists.get(user)
                if known is None:
                    self._cold += 1
                    continue
                if item in known[1]:
                    self._hits += 1
                else:
                    self._misses += 1
                self._popular_hits += item in self._popular

    def totals(self) -> HitTotals:
        """The counts so far (a consistent copy)."""
        with self._lock:
            return HitTotals(self._hits, self._misses, self._cold, self._popular_hits)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)
