"""The published HR@K of `casm serve`: whether the lists this service published were hit by the
users' later target events, beside the same rate of the lists a popularity recommender would
have published at the same moments.

The publisher records each user's newest *acknowledged* list (`published`, producer I/O thread)
together with the popularity list it ranked for the same user at the same moment, with the same
exclusions (`serve.exclude_behaviours`): the baseline served the way the model is, refreshed when
the model's list is. The apply stage asks, for every applied target-behaviour event, whether its
item is in that user's last list (`observe`, apply thread): a hit or a miss, and whether it is in
the popularity list beside it. Users with no list yet are "cold" and not counted. Memory is
bounded: at most `max_users` users (the least recently published dropped first), two lists each
(popularity lists equal to the previous one share its set). One lock: every method may be called
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
    popular_hits: int = 0  # of hits + misses, the item was in the user's popularity list

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
        # user -> (at, items, popularity's items)
        self._lists: OrderedDict[str, tuple[float, frozenset[str], frozenset[str]]] = OrderedDict()
        self._popular: frozenset[str] = frozenset()  # the last popularity list (shared while it repeats)
        self._hits = self._misses = self._cold = self._popular_hits = 0

    def published(self, user: str, items: Sequence[str], at: float, popular: Iterable[str] = ()) -> None:
        """`user`'s list of `items`, generated at unix time `at` (s), was acknowledged; `popular`:
        the popularity list ranked for the same user at the same moment. A list acknowledged
        after a newer one of the same user is ignored."""
        popular = frozenset(popular)
        with self._lock:
            known = self._lists.get(user)
            if known is not None and known[0] > at:
                return
            if popular == self._popular:
                popular = self._popular
            self._popular = popular
            self._lists[user] = (at, frozenset(items), popular)
            self._lists.move_to_end(user)
            while len(self._lists) > self.max_users:
                self._lists.popitem(last=False)

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
                self._popular_hits += item in known[2]

    def totals(self) -> HitTotals:
        """The counts so far (a consistent copy)."""
        with self._lock:
            return HitTotals(self._hits, self._misses, self._cold, self._popular_hits)

    def __len__(self) -> int:
        with self._lock:
            return len(self._lists)
