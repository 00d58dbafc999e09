"""The read side: padded sequences, vocabularies, sizes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.state._synth import open_store, simple, store_with_users


def test_width_keeps_the_newest_events_or_pads_more() -> None:
    with open_store(sequence_length=4) as store:
        store.apply(simple(["a"] * 3, ["x", "y", "z"]))
        narrow = store.sequences(["a"], width=2)
        np.testing.assert_array_equal(narrow.items, [[2, 3]])
        assert narrow.lengths.tolist() == [2]
        wide = store.sequences(["a"], width=6)
        np.testing.assert_array_equal(wide.items, [[0, 0, 0, 1, 2, 3]])
        assert wide.lengths.tolist() == [3]
        with pytest.raises(ValueError):
            store.sequences(["a"], width=0)


def test_sequences_of_repeated_and_empty_user_lists() -> None:
    with store_with_users(3) as store:
        seqs = store.sequences(["u1", "u1", "zz"])
        np.testing.assert_array_equal(seqs.items[0], seqs.items[1])
        assert seqs.user_ids == ["u1", "u1", "zz"]
        empty = store.sequences([])
        assert empty.items.shape == (0, 5) and empty.lengths.shape == (0,)
    with open_store() as store:
        assert store.sequences(["a"]).items.shape == (1, 5)  # nothing applied yet


def test_stats_and_partitions() -> None:
    with store_with_users(4) as store:
        stats = store.stats()
        assert stats["users"] == 4 and stats["events_held"] == 8
        assert stats["events_applied"] == 8 and stats["batches"] == 2
        assert store.partitions() == [("behaviours", 0)]
        assert store.user_ids() == ["u0", "u1", "u2", "u3"]


def test_reads_of_the_mirror_do_not_wait_for_a_write_in_progress() -> None:
    import threading

    with store_with_users(3) as store:
        writing, release = threading.Event(), threading.Event()
        append = store.db.append

        def slow_append(inserts):
            writing.set()
            assert release.wait(10)
            append(inserts)

        store.db.append = slow_append
        writer = threading.Thread(target=lambda: store.apply(simple(["u0"], ["i9"], start=100)))
        writer.start()
        try:
            assert writing.wait(10)
            answered = threading.Event()
            reader = threading.Thread(target=lambda: (store.sequences(["u0"]), store.item_ids(), store.offsets("t"),
                                                      answered.set()))
            reader.start()
            assert answered.wait(5), "a read waited for the DuckDB write"
            assert store.sequences(["u0"]).n_events[0] == 2  # the batch is not visible before its commit
        finally:
            release.set()
            writer.join(10)
        assert store.sequences(["u0"]).n_events[0] == 3
