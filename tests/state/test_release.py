"""`StateStore.release`: a partition that moved to another instance leaves the store; what stays
is exactly the state of the other partitions, in the file and in the mirror."""

from __future__ import annotations

from pathlib import Path

from tests.state._synth import TOPIC, open_store, simple, state_dump


def _two_partitions(store, start: int = 0) -> None:
    store.apply(simple(["a", "b", "a"], ["i1", "i2", "i3"], start=start, partition=0), {(TOPIC, 0): start + 3})
    store.apply(simple(["c", "d"], ["i2", "i4"], start=start, partition=1), {(TOPIC, 1): start + 2})


def test_release_leaves_exactly_the_other_partitions(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path) as kept_only:  # the reference: partition 1 never applied
        kept_only.apply(simple(["a", "b", "a"], ["i1", "i2", "i3"], partition=0), {(TOPIC, 0): 3})
        expected = state_dump(kept_only)
    with open_store(tmp_path / "both.duckdb") as store:
        _two_partitions(store)
        store.registry.record_published(["c", "a"], 1, [["i1"], ["i2"]], event_offsets=[0, 2])
        store.fold()
        store.apply(simple(["d"], ["i5"], start=2, partition=1), {(TOPIC, 1): 3, ("changelog", 1): 7})
        removed = store.release([(TOPIC, 1), ("changelog", 1)])
        assert removed == 3
        after = state_dump(store)
        assert sorted(store.registry.last_published(["a", "c"])) == ["a"]
    # The vocabulary keeps the released partition's items (indices never change); the rest is equal.
    assert after["items"][:3] == expected["items"] and set(after["items"]) >= {"i4", "i5"}
    for key in ("users", "popularity", "offsets", "events"):
        assert after[key] == expected[key], key
    with open_store(tmp_path / "both.duckdb") as reopened:  # the file says the same
        assert state_dump(reopened) == after


def test_released_partition_applies_again_from_zero(tmp_path: Path) -> None:
    with open_store(tmp_path / "s.duckdb") as store:
        _two_partitions(store)
        store.release([(TOPIC, 1)])
        assert store.offsets(TOPIC) == {0: 3}
        result = store.apply(simple(["c", "d"], ["i2", "i4"], partition=1), {(TOPIC, 1): 2})
        assert result.applied == 2  # nothing of the old partition 1 is remembered (ids included)
        assert store.stats()["events_applied"] == 5
