"""Property tests: the rolling sequence is "the last N events of the user, in order" for any
interleaving of users and any batch boundaries; redelivery never changes the result."""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state.dedup import EventIdIndex, hash_ids
from state.sequences import RollingSequences
from tests.state._synth import BEHAVIOURS, TOPIC, events, open_store, state_dump

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60,
                    suppress_health_check=[HealthCheck.too_slow])
# Each example of these opens stores (and files): fewer examples keep the default run short.
FEWER = settings(SETTINGS, max_examples=30)
FEWEST = settings(SETTINGS, max_examples=12)

event_lists = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]),  # user
              st.integers(0, 7),                            # item
              st.integers(0, len(BEHAVIOURS) - 1),          # behaviour
              st.integers(0, 2)),                           # partition
    min_size=0, max_size=60,
)


def _with_offsets(evs: list[tuple[str, int, int, int]]) -> list[dict]:
    next_offset: Counter[int] = Counter()
    rows = []
    for k, (user, item, behaviour, partition) in enumerate(evs):
        rows.append({"user_id": user, "item_id": f"i{item}", "behavior": BEHAVIOURS[behaviour],
                     "partition": partition, "offset": next_offset[partition],
                     "event_id": f"e{k}" if k % 3 else None})
        next_offset[partition] += 1
    return rows


def _batches(rows: list[dict], cuts: list[int]) -> list[list[dict]]:
    bounds = sorted({0, len(rows), *[c % (len(rows) + 1) for c in cuts]})
    return [rows[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _expected(rows: list[dict], n: int) -> dict[str, list[tuple[str, str]]]:
    per_user: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for r in rows:
        per_user[r["user_id"]].append((r["item_id"], r["behavior"]))
    return {u: s[-n:] for u, s in per_user.items()}


@pytest.mark.slow
@settings(SETTINGS, max_examples=1_000)
@given(evs=event_lists, cuts=st.lists(st.integers(0, 100), max_size=12),
       n=st.integers(1, 8))
def test_rolling_sequence_is_the_last_n_events_in_order_thoroughly(evs, cuts, n) -> None:
    test_rolling_sequence_is_the_last_n_events_in_order.hypothesis.inner_test(evs, cuts, n)


def _observed(store) -> dict[str, list[tuple[str, str]]]:
    return {u: list(zip(v[0], v[1], strict=True)) for u, v in state_dump(store)["users"].items()}


@SETTINGS
@given(evs=event_lists, cuts=st.lists(st.integers(0, 100), max_size=8),
       n=st.integers(1, 6))
def test_rolling_sequence_is_the_last_n_events_in_order(evs, cuts, n) -> None:
    rows = _with_offsets(evs)
    with open_store(sequence_length=n) as store:
        for batch in _batches(rows, cuts):
            store.apply(events(batch))
        assert _observed(store) == _expected(rows, n)
        dump = state_dump(store)
        assert {u: v[2] for u, v in dump["users"].items()} == dict(
            Counter(r["user_id"] for r in rows))
        assert dump["popularity"] == dict(Counter(r["item_id"] for r in rows))
        last = {r["user_id"]: (r["partition"], r["offset"]) for r in rows}
        assert {u: (v[4], v[5]) for u, v in dump["users"].items()} == last
        # Items are numbered in order of first appearance.
        assert store.item_ids() == list(dict.fromkeys(r["item_id"] for r in rows))


@FEWER
@given(evs=event_lists, cuts=st.lists(st.integers(0, 100), max_size=6),
       replays=st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=4))
def test_redelivering_any_slice_changes_nothing(evs, cuts, replays) -> None:
    rows = _with_offsets(evs)
    batches = _batches(rows, cuts)
    with open_store(sequence_length=4) as clean:
        for batch in batches:
            clean.apply(events(batch))
        expected = state_dump(clean)
    with open_store(sequence_length=4) as store:
        applied = 0
        for k, batch in enumerate(batches):
            store.apply(events(batch))
            applied += len(batch)
            for a, b in replays[k % max(len(replays), 1):][:1]:
                lo, hi = sorted((a % (applied + 1), b % (applied + 1)))
                again = store.apply(events(rows[lo:hi]))
                assert again.applied == 0 and again.batch_seq is None
        assert state_dump(store) == expected


@FEWEST
@given(evs=event_lists, cuts=st.lists(st.integers(0, 100), max_size=6),
       fold_events=st.integers(1, 30))
def test_reopening_between_batches_gives_the_same_state(evs, cuts, fold_events) -> None:
    rows = _with_offsets(evs)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.duckdb"
        for k, batch in enumerate(_batches(rows, cuts)):
            store = open_store(path, sequence_length=3, fold_events=fold_events)
            store.apply(events(batch))
            if k % 2:
                store.close()
            else:
                store.db.close()  # no fold on the way out
        with open_store(path, sequence_length=3) as store:
            assert _observed(store) == _expected(rows, 3)


@settings(derandomize=True, deadline=None, max_examples=200)
@given(chunks=st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 50)),
                                max_size=40), max_size=8),
       n=st.integers(1, 7))
def test_rolling_sequences_append_matches_a_naive_model(chunks, n) -> None:
    rs = RollingSequences(n)
    rs.topic_code(TOPIC)
    naive: dict[str, list[int]] = defaultdict(list)
    seq = 0
    for chunk in chunks:
        users = [f"u{u}" for u, _ in chunk]
        items = np.array([i for _, i in chunk], dtype=np.int64)
        m = len(chunk)
        rs.append(users, items, items % 5, np.arange(seq, seq + m), np.zeros(m, np.int32),
                  np.zeros(m, np.int32), np.arange(seq, seq + m), np.zeros(m),
                  np.full(m, -1))
        seq += m
        for user, item in zip(users, items.tolist(), strict=True):
            naive[user].append(item)
    users = sorted(naive)
    got = rs.gather(users)
    for k, user in enumerate(users):
        want = naive[user][-n:]
        assert got.items[k].tolist() == [0] * (n - len(want)) + want
        assert got.behaviours[k].tolist() == [0] * (n - len(want)) + [i % 5 for i in want]
        assert got.lengths[k] == len(want) and got.n_events[k] == len(naive[user])


@settings(derandomize=True, deadline=None, max_examples=100)
@given(batches=st.lists(st.lists(st.text(min_size=0, max_size=20), max_size=30), max_size=10))
def test_event_id_index_remembers_exactly_what_was_added(batches) -> None:
    index = EventIdIndex()
    seen: dict[str, int] = {}
    for t, ids in enumerate(batches):
        hashes = hash_ids(ids)
        assert index.contains(hashes).tolist() == [i in seen for i in ids]
        new = [i for i in dict.fromkeys(ids) if i not in seen]
        index.add(hash_ids(new), float(t))  # the store adds only ids it applied
        seen.update(dict.fromkeys(new, t))
        # A hash never depends on the other strings hashed with it.
        assert [int(hash_ids([i])[0]) for i in ids] == hashes.tolist()
    assert len(index) == len(seen)
    if batches:
        cutoff = len(batches) - 2
        index.expire(float(cutoff))
        kept = sorted(i for i, t in seen.items() if t >= cutoff)
        assert len(index) == len(kept)
        assert index.contains(hash_ids(sorted(seen))).tolist() == [
            seen[i] >= cutoff for i in sorted(seen)]


def test_hashes_are_stable_across_processes_and_versions() -> None:
    # Stored in the file: changing the function would break the id memory of existing files.
    np.testing.assert_array_equal(hash_ids(["a", "", "e0-1", "é" * 40]),
                                  hash_ids(["a", "", "e0-1", "é" * 40]))
    assert hash_ids(["a", "a\x00"]).tolist()[0] != hash_ids(["a", "a\x00"]).tolist()[1]
    assert hash_ids(["e0-1"]).tolist() == [_FROZEN_E0_1]


_FROZEN_E0_1 = -4398626851791863136
