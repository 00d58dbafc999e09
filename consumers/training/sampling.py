"""Which users' sequences the trainer starts from: a training-sample policy over the state store,
read through its public reads (`StateStore.activity`, `StateStore.sequences`)."""

from __future__ import annotations

import numpy as np

from state import Sequences, StateStore


def sample_training_sequences(
    store: StateStore,
    n: int,
    *,
    seed: int,
    recent_fraction: float,
    recent_users: int | None = None,
    min_length: int = 1,
    width: int | None = None,
) -> Sequences:
    """A sample of users' sequences for fine-tuning: recently touched users first, then a
    uniform share of all users (so training does not forget the others).

    Args:
        store: the state store.
        n: users wanted (fewer when fewer users have `min_length` events).
        seed: seeds the random choice (same state + same seed = same sample).
        recent_fraction: share of `n` taken from recent users, in [0, 1].
        recent_users: the recent share is drawn uniformly from this many most recently
            touched users (None: exactly the most recent users).
        min_length: only users with at least this many events in their sequence.
        width: columns of the arrays (default: the store's sequence length).

    Returns:
        `Sequences`: the recent users (newest first), then the uniform share.
    """
    if n < 0 or min_length < 0:
        raise ValueError("n and min_length must be >= 0")
    fraction = float(recent_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"recent_fraction must be in [0, 1], got {fraction}")
    activity = store.activity()
    held = len(activity.user_ids)
    eligible = np.flatnonzero(activity.lengths >= min_length).astype(np.int64)
    k = min(int(n), eligible.size)
    n_recent = int(round(k * fraction))
    rng = np.random.default_rng(seed)
    recent = np.zeros(0, dtype=np.int64)
    if n_recent:
        pool = n_recent if recent_users is None else min(max(recent_users, n_recent),
                                                         eligible.size)
        last = activity.last_seq[eligible]
        top = np.argpartition(-last, pool - 1)[:pool] if pool < eligible.size else (
            np.arange(eligible.size))
        top = top[np.argsort(-last[top], kind="stable")]
        if pool > n_recent:
            top = top[np.sort(rng.choice(pool, size=n_recent, replace=False))]
        recent = eligible[top]
    taken = np.zeros(held, dtype=bool)
    taken[recent] = True
    rest = eligible[~taken[eligible]]
    uniform = rng.choice(rest, size=k - n_recent, replace=False) if k > n_recent else (
        np.zeros(0, dtype=np.int64))
    rows = np.concatenate([recent, uniform.astype(np.int64)])
    return store.sequences([activity.user_ids[r] for r in rows.tolist()], width=width)
