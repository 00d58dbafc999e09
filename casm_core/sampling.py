"""Vectorised batch building: users' event sequences in CSR layout, training windows, and
negative items sampled away from what each user touched. No per-sample Python loops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Rejection sampling redraws the negatives that hit a user's own items, only the clashes each
# round. With a skewed (popularity) distribution a user's own popular items can keep clashing, so
# after half the rounds the redraws are uniform. The bound is reached only when a user touched
# (almost) every item; the few clashes left then are kept rather than looping for ever.
MAX_REJECTION_ROUNDS = 64


@dataclass(frozen=True)
class SequenceCorpus:
    """Event sequences of `num_users` users: user u's events are
    ``items[offsets[u]:offsets[u+1]]`` (int64, 1-based, oldest first) with aligned `behaviours`."""

    offsets: np.ndarray
    items: np.ndarray
    behaviours: np.ndarray

    @classmethod
    def from_events(
        cls, users: np.ndarray, items: np.ndarray, behaviours: np.ndarray, num_users: int
    ) -> SequenceCorpus:
        """Group events (in chronological order) by dense user code 0..num_users-1, keeping order."""
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=num_users)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return cls(offsets, np.asarray(items, np.int64)[order], np.asarray(behaviours, np.int64)[order])

    @classmethod
    def from_padded(cls, items: np.ndarray, behaviours: np.ndarray) -> SequenceCorpus:
        """One user per row of left-padded arrays [n, W] (zeros are padding)."""
        real = items != 0
        offsets = np.concatenate([[0], np.cumsum(real.sum(axis=1))]).astype(np.int64)
        return cls(offsets, items[real].astype(np.int64), behaviours[real].astype(np.int64))

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def windows(self, users: np.ndarray, ends: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """The `width` events before position `ends` (exclusive, counted within each user's
        sequence) of each user, left-padded: items, behaviours int64 [len(users), width]."""
        starts = self.offsets[users]
        stops = starts + ends
        index = stops[:, None] - width + np.arange(width)[None, :]
        real = index >= starts[:, None]
        index = np.where(real, index, 0)
        return np.where(real, self.items[index], 0), np.where(real, self.behaviours[index], 0)

    def item_keys(self, users: np.ndarray, stride: int) -> np.ndarray:
        """Sorted unique keys ``row * stride + item`` of every item the given users touched,
        where row is the position of the user in `users`."""
        starts = self.offsets[users]
        lengths = self.offsets[users + 1] - starts
        rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
        within = np.arange(lengths.sum(), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return np.unique(rows * stride + self.items[np.repeat(starts, lengths) + within])


def padded_item_keys(items: np.ndarray, stride: int) -> np.ndarray:
    """Sorted unique keys ``row * stride + item`` of the non-padding items of rows [n, W]."""
    rows = np.broadcast_to(np.arange(items.shape[0], dtype=np.int64)[:, None], items.shape)
    real = items != 0
    return np.unique(rows[real] * stride + items[real])


def contains_sorted(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Boolean mask of `keys` (any shape) found in the sorted 1-D array `sorted_keys`."""
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    position = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    return sorted_keys[position] == keys


class NegativeSampler:
    """Draws negative items from 1..num_items, uniformly or by popularity**exponent, never an
    item in the row's excluded set."""

    def __init__(self, num_items: int, popularity: np.ndarray | None = None, exponent: float = 1.0) -> None:
        self.num_items = num_items
        self._cdf = None
        if popularity is not None:
            weights = np.asarray(popularity[1 : num_items + 1], dtype=np.float64) ** exponent
            if weights.sum() > 0:
                self._cdf = np.cumsum(weights) / weights.sum()

    def _draw(self, rng: np.random.Generator, size: int | tuple[int, ...], uniform: bool = False) -> np.ndarray:
        if self._cdf is None or uniform:
            return rng.integers(1, self.num_items + 1, size=size, dtype=np.int64)
        picks = np.searchsorted(self._cdf, rng.random(size), side="right")
        return np.minimum(picks, self.num_items - 1).astype(np.int64) + 1

    def sample(
        self, rng: np.random.Generator, shape: tuple[int, ...], excluded_keys: np.ndarray, stride: int
    ) -> np.ndarray:
        """Negatives int64 of `shape` (first axis = row); row r never gets an item i with
        ``r * stride + i`` in `excluded_keys` (sorted)."""
        if excluded_keys.size > 1 and (np.diff(excluded_keys) < 0).any():
            raise ValueError("excluded_keys must be sorted ascending")
        negatives = self._draw(rng, shape)
        rows = np.arange(shape[0], dtype=np.int64).reshape((-1,) + (1,) * (len(shape) - 1))
        for round_ in range(MAX_REJECTION_ROUNDS):
            clash = contains_sorted(excluded_keys, rows * stride + negatives)
            count = int(clash.sum())
            if count == 0:
                break
            negatives[clash] = self._draw(rng, count, uniform=round_ >= MAX_REJECTION_ROUNDS // 2)
        return negatives


@dataclass(frozen=True)
class TrainingBatch:
    """Inputs and next-event targets of a batch, all int64 [B, W] (negatives [B, W, K])."""

    input_items: np.ndarray
    input_behaviours: np.ndarray
    target_items: np.ndarray
    target_behaviours: np.ndarray
    negatives: np.ndarray

    @property
    def has_target(self) -> np.ndarray:
        """Positions with both an input event and a next event."""
        return (self.input_items != 0) & (self.target_items != 0)


def window_negatives(
    input_items: np.ndarray, target_items: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` negatives per position drawn from the user's own earlier events: for inputs
    input_items [B, W] (left-padded) and next-event targets target_items [B, W], item
    ``input_items[b, j]`` with j uniform over the real positions <= t; 0 (no negative) where the
    draw is the positive itself or the position has no input. Returns int64 [B, W, count]."""
    batch, width = input_items.shape
    first = width - (input_items != 0).sum(axis=1)  # first real column of each row
    t = np.arange(width)[None, :, None]
    span = np.maximum(t - first[:, None, None] + 1, 1)
    picks = first[:, None, None] + (rng.random((batch, width, count)) * span).astype(np.int64)
    picks = np.minimum(picks, t)
    drawn = np.take_along_axis(input_items, picks.reshape(batch, -1), axis=1).reshape(batch, width, count)
    valid = (t >= first[:, None, None]) & (drawn != target_items[:, :, None])
    return np.where(valid, drawn, 0)


def training_batch(
    items: np.ndarray,
    behaviours: np.ndarray,
    excluded_keys: np.ndarray,
    sampler: NegativeSampler,
    num_negatives: int,
    rng: np.random.Generator,
    num_window_negatives: int = 0,
) -> TrainingBatch:
    """Shift windows items/behaviours [B, L+1] into inputs [B, L] and next-event targets, and
    sample `num_negatives` negatives per position (excluded: keys ``row * (num_items+1) + item``)
    followed by `num_window_negatives` drawn from the row's earlier events (0 where none)."""
    batch, width = items.shape
    negatives = sampler.sample(rng, (batch, width - 1, num_negatives), excluded_keys, sampler.num_items + 1)
    inputs, targets = items[:, :-1], items[:, 1:]
    if num_window_negatives:
        negatives = np.concatenate([negatives, window_negatives(inputs, targets, num_window_negatives, rng)], axis=2)
    return TrainingBatch(
        input_items=inputs,
        input_behaviours=behaviours[:, :-1],
        target_items=targets,
        target_behaviours=behaviours[:, 1:],
        negatives=negatives,
    )
