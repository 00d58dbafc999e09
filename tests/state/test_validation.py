"""What `apply` checks itself (column types and presence, Kafka order, the offsets map, the
vocabularies) refuses the whole batch with `InvalidEventError` and writes nothing; the rows'
content is the decoder's to validate, and the store trusts it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from state import InvalidEventError, StoreError
from state.validate import EVENT_SCHEMA
from stream.decode import DECODED_SCHEMA
from tests.state._synth import NOW, T0, TOPIC, events, open_store, simple, state_dump

GOOD = {"user_id": "a", "item_id": "x", "offset": 10, "event_id": "ok"}

#: Rows the store refuses by its own invariants: (override of the second row, reason).
BAD_ROWS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown behaviour": ({"behavior": "share"}, "unknown behavior 'share'"),
    "missing user": ({"user_id": None}, "user_id is missing"),
    "missing item": ({"item_id": None}, "item_id is missing"),
    "missing behaviour": ({"behavior": None}, "behavior is missing"),
    "missing offset": ({"offset": None}, "offset is missing"),
}


def _seeded_store() -> Any:
    store = open_store()
    store.apply(simple(["a", "b"], ["x", "y"]), {(TOPIC, 0): 10})
    return store


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_raises_and_writes_nothing(case: str) -> None:
    override, reason = BAD_ROWS[case]
    with _seeded_store() as store:
        before, stats = state_dump(store), store.stats()
        table = events([{**GOOD, "user_id": "c", "offset": 10},
                        {**GOOD, "offset": 11, "event_id": "ok2", **override}])
        with pytest.raises(InvalidEventError) as info:
            store.apply(table, {(TOPIC, 0): 20})
        assert reason in str(info.value)
        assert info.value.rows.tolist() == [1] and info.value.reasons == [reason]
        assert isinstance(info.value, StoreError) and isinstance(info.value, ValueError)
        assert state_dump(store) == before and store.stats() == stats


def test_row_content_is_the_decoders_to_validate() -> None:
    # Ids past the decoder's limits, a millisecond timestamp, a negative offset: the stream
    # leaf dead-letters these before they reach the store, which no longer re-checks rows.
    with open_store(max_id_length=4) as store:
        table = events([
            {"user_id": "u" * 200, "item_id": "", "event_id": "e" * 200, "offset": 0,
             "timestamp": T0 * 1000},
            {"user_id": "v", "item_id": "i", "offset": 1, "timestamp": float("nan")},
        ])
        result = store.apply(table)
        assert result.applied == 2 and store.user_ids() == ["u" * 200, "v"]
        assert store.item_ids() == ["", "i"]


def test_decoded_tables_are_read_without_a_cast() -> None:
    # The contract that lets `apply` trust the decoder: same columns, same types.
    decoded = {f.name: f.type for f in DECODED_SCHEMA}
    assert decoded == {f.name: f.type for f in EVENT_SCHEMA}


def test_new_behaviour_names_must_fit_the_vocabulary() -> None:
    with open_store(max_id_length=4, open_vocabulary=True) as store:
        table = events([{"user_id": "uuuu", "item_id": "éééé", "event_id": "eeee",
                         "behavior": "bbbb", "offset": 0, "timestamp": NOW + 86_400}])
        assert store.apply(table).applied == 1
        before = state_dump(store)
        with pytest.raises(InvalidEventError, match="longer than 4") as info:
            store.apply(events([{"user_id": "u", "item_id": "i", "behavior": "pv", "offset": 1},
                                {"user_id": "u", "item_id": "i", "behavior": "bbbbb",
                                 "offset": 2}]))
        assert info.value.rows.tolist() == [1]
        with pytest.raises(InvalidEventError, match="empty"):
            store.apply(events([{"user_id": "u", "item_id": "i", "behavior": "", "offset": 3}]))
        assert state_dump(store) == before


def test_unknown_behaviour_of_a_redelivered_row_is_dropped_not_refused() -> None:
    with _seeded_store() as store:
        before = state_dump(store)
        result = store.apply(events([{**GOOD, "offset": 3, "behavior": "share"}]))
        assert result.applied == 0 and result.duplicate_offsets == 1
        assert state_dump(store) == before


def test_offsets_out_of_order_within_a_partition_are_refused() -> None:
    with _seeded_store() as store:
        before = state_dump(store)
        table = events([{**GOOD, "offset": 12}, {**GOOD, "offset": 11, "event_id": "b"}])
        with pytest.raises(InvalidEventError, match="previous offset") as info:
            store.apply(table)
        assert info.value.rows.tolist() == [1]
        assert state_dump(store) == before
        # The same offsets on two partitions are fine.
        ok = events([{**GOOD, "offset": 12}, {**GOOD, "offset": 12, "partition": 1,
                                                "event_id": "b"}])
        assert store.apply(ok).applied == 2


def test_offsets_map_below_the_batch_is_refused() -> None:
    with _seeded_store() as store:
        before = state_dump(store)
        with pytest.raises(InvalidEventError, match="not above the batch's offset"):
            store.apply(simple(["c", "d"], ["x", "y"], start=10), {(TOPIC, 0): 11})
        assert state_dump(store) == before


@pytest.mark.parametrize("offsets", [
    {(TOPIC, -1): 3}, {("", 0): 3}, {(TOPIC, 0): -3}, {TOPIC: 3}, {(TOPIC, 0): 2.5},
    {(TOPIC, "0"): 3}, {(TOPIC, 0): True},
])
def test_malformed_offsets_map_is_refused(offsets: dict) -> None:
    with _seeded_store() as store:
        before = state_dump(store)
        with pytest.raises(InvalidEventError, match="offsets"):
            store.apply(events([]), offsets)
        assert state_dump(store) == before


def test_missing_column_and_uncastable_type_are_refused() -> None:
    with _seeded_store() as store:
        with pytest.raises(InvalidEventError, match="required column") as info:
            store.apply(simple(["c"], ["x"], start=10).drop_columns(["offset"]))
        assert info.value.rows.size == 0
        table = simple(["c"], ["x"], start=10)
        bad = table.set_column(table.schema.get_field_index("timestamp"), "timestamp",
                               pa.array(["yesterday"]))
        with pytest.raises(InvalidEventError, match="timestamp"):
            store.apply(bad)
        with pytest.raises(InvalidEventError, match="pyarrow.Table"):
            store.apply({"user_id": ["a"]})  # type: ignore[arg-type]


def test_all_rows_are_kept_but_the_message_is_short() -> None:
    with open_store() as store:
        rows = [{**GOOD, "behavior": "nope", "offset": k, "event_id": f"e{k}"} for k in range(9)]
        with pytest.raises(InvalidEventError) as info:
            store.apply(events(rows))
        assert len(info.value.reasons) == 9 and "and 4 more" in str(info.value)
        np.testing.assert_array_equal(info.value.rows, np.arange(9))
        assert store.stats()["events_held"] == 0
