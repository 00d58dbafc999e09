"""The live trainer's training data: the newest windows of recently active users and a reservoir
of older users, mixed in each batch.

Rows are users' windows (left-padded item / behaviour indices [W]), keyed by user. Two pools:

- **newest**: the windows of the `recent_capacity` most recently updated users (least recently
  updated evicted first): what the stream just taught.
- **reservoir**: a uniform sample of every user ever added, each kept at its newest window: what
  must not be forgotten. A bottom-k sample: the `reservoir_capacity` users whose seeded hash of
  the key is smallest. Whether a user is in it depends on the key alone, not on when or how
  often the user was added, so a user fed again and again (an active one, or one added first by
  the start-up seed) is no likelier to be kept than any other.

`sample(n)` draws `round(n * recent_share)` rows from the newest pool and the rest from the
reservoir, uniformly within each. Pure numpy; seeded.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Hashable, Sequence

import numpy as np


class _Pool:
    """Fixed-capacity rows [capacity, W] with a key -> slot map."""

    def __init__(self, capacity: int, width: int) -> None:
        self.items = np.zeros((capacity, width), dtype=np.int64)
        self.behaviours = np.zeros((capacity, width), dtype=np.int64)
        self.slots: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self.slots)

    def write(self, slot: int, items: np.ndarray, behaviours: np.ndarray) -> None:
        self.items[slot] = items
        self.behaviours[slot] = behaviours


class ReplayBuffer:
    """Newest windows + reservoir of older users (see the module docstring)."""

    def __init__(self, width: int, recent_capacity: int, reservoir_capacity: int, seed: int = 0) -> None:
        if recent_capacity < 1 or reservoir_capacity < 1:
            raise ValueError("both pools need a capacity of at least 1")
        self.width = width
        self.rng = np.random.default_rng(seed)
        self._recent = _Pool(recent_capacity, width)
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest update first
        self._reservoir = _Pool(reservoir_capacity, width)
        self._members: list[tuple[int, Hashable]] = []  # max-heap of (-priority, key) of the reservoir
        self._salt = int(seed).to_bytes(8, "little", signed=True)

    def __len__(self) -> int:
        return len(self._reservoir)

    @property
    def sizes(self) -> tuple[int, int]:
        """(rows in the newest pool, rows in the reservoir)."""
        return len(self._recent), len(self._reservoir)

    def add(self, keys: Sequence[Hashable], items: np.ndarray, behaviours: np.ndarray, recent: bool = True) -> None:
        """The newest windows of users `keys`: items, behaviours [len(keys), W'] (W' is cut or
        left-padded to the buffer's width). Rows with fewer than two events are ignored (no
        training position). `recent=False`: old windows (a start-up seed), reservoir only."""
        items, behaviours = self._fit(items), self._fit(behaviours)
        usable = (items != 0).sum(axis=1) >= 2
        for row in np.flatnonzero(usable).tolist():
            key = keys[row]
            if recent:
                self._add_recent(key, items[row], behaviours[row])
            self._add_reservoir(key, items[row], behaviours[row])

    def _fit(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array, dtype=np.int64)
        if array.shape[1] >= self.width:
            return array[:, array.shape[1] - self.width :]
        return np.pad(array, ((0, 0), (self.width - array.shape[1], 0)))

    def _add_recent(self, key: Hashable, items: np.ndarray, behaviours: np.ndarray) -> None:
        pool = self._recent
        slot = pool.slots.get(key)
        if slot is None:
            if len(pool) < pool.items.shape[0]:
                slot = len(pool)
            else:
                evicted, _ = self._order.popitem(last=False)
                slot = pool.slots.pop(evicted)
            pool.slots[key] = slot
        self._order[key] = None
        self._order.move_to_end(key)
        pool.write(slot, items, behaviours)

    def _priority(self, key: Hashable) -> int:
        digest = hashlib.blake2b(repr(key).encode(), digest_size=8, salt=self._salt.ljust(16, b"\0")).digest()
        return int.from_bytes(digest, "little")

    def _add_reservoir(self, key: Hashable, items: np.ndarray, behaviours: np.ndarray) -> None:
        pool = self._reservoir
        slot = pool.slots.get(key)
        if slot is None:
            priority = self._priority(key)
            if len(pool) < pool.items.shape[0]:
                slot = len(pool)
            elif priority < -self._members[0][0]:  # smaller than the largest kept: it takes that slot
                _, evicted = heapq.heappop(self._members)
                slot = pool.slots.pop(evicted)
            else:
                return
            heapq.heappush(self._members, (-priority, key))
            pool.slots[key] = slot
        pool.write(slot, items, behaviours)

    def sample(self, n: int, recent_share: float) -> tuple[np.ndarray, np.ndarray]:
        """`n` rows (fewer when the pools hold fewer): items, behaviours int64 [n, W]."""
        n_recent, n_reservoir = len(self._recent), len(self._reservoir)
        if n_reservoir == 0:
            empty = np.zeros((0, self.width), dtype=np.int64)
            return empty, empty
        want_recent = min(int(round(n * recent_share)), n_recent)
        want_old = min(n - want_recent, n_reservoir)
        picks_recent = self.rng.choice(n_recent, size=want_recent, replace=False)
        picks_old = self.rng.choice(n_reservoir, size=want_old, replace=False)
        items = np.concatenate([self._recent.items[picks_recent], self._reservoir.items[picks_old]])
        behaviours = np.concatenate([self._recent.behaviours[picks_recent], self._reservoir.behaviours[picks_old]])
        return items, behaviours
