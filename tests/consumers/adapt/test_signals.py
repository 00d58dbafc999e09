"""The signals' view of a batch: the watched users' applied rows and their windows before it,
from what the store's apply returned."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from consumers.adapt.signals import SignalWatch
from consumers.serve.service import open_store
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics


def settings_with(share: float, seed: int = 0) -> CasmSettings:
    settings = CasmSettings(progress=False)
    settings.store.path = ":memory:"
    settings.drift.user_share = share
    settings.drift.seed = seed
    return settings


def watch(settings: CasmSettings, store) -> SignalWatch:
    return SignalWatch(settings, store, producer=None, metrics=ServiceMetrics(60.0), set_alpha=lambda a, r: a,
                       alpha=lambda: {})


def batch(users: list[str], start: int) -> pa.Table:
    n = len(users)
    return pa.table({
        "user_id": users, "item_id": [f"i{(start + k) % 11}" for k in range(n)],
        "behavior": ["buy" if k % 4 == 0 else "pv" for k in range(n)],
        "timestamp": np.arange(n, dtype=np.float64) + 1.7e9 + start, "event_id": pa.nulls(n, pa.string()),
        "topic": ["behaviours"] * n, "partition": pa.array([0] * n, pa.int32()),
        "offset": pa.array(np.arange(start, start + n), pa.int64()), "produced_ms": pa.array([0] * n, pa.int64()),
    })


def test_a_share_watches_a_fixed_hashed_set_of_users_with_all_their_rows() -> None:
    users = [f"u{k}" for k in range(2000)]
    settings = settings_with(0.25)
    with open_store(settings) as store:
        signals = watch(settings, store)
        inside = signals.watched(users)
        assert 0.2 < inside.mean() < 0.3
        assert np.array_equal(watch(settings, store).watched(users), inside)  # the same set every run
        assert not np.array_equal(watch(settings_with(0.25, seed=1), store).watched(users), inside)
        assert watch(settings_with(1.0), store).watched(users).all()

        chosen = {u for u, yes in zip(users, inside.tolist(), strict=True) if yes}
        first = batch(users[:50] * 2, 0)
        store.apply(first, before_width=settings.model.max_len)
        events = batch(users[:50] * 3, 100)
        before = store.sequences(users[:50], width=settings.model.max_len)
        result = store.apply(events, before_width=settings.model.max_len)
        job = signals.prepare(events, result, None, 0, first.num_rows)
        kept = job.events.column("user_id").to_pylist()
        assert set(kept) == chosen & set(users[:50]) and len(kept) == 3 * len(set(kept))  # every row of each
        assert job.events.column("offset").to_pylist() == sorted(job.events.column("offset").to_pylist())
        for row, user in enumerate(kept):  # each row points at its user's window before the batch
            at = users.index(user)
            assert np.array_equal(job.stored_items[job.user_codes[row]], before.items[at])
        assert job.scorer is None and job.scored_rows.size == 0  # no model: nothing ranked
