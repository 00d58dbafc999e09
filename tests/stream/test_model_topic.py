"""Model versions on the models topic: chunked, reassembled, retried chunks harmless."""

from __future__ import annotations

import numpy as np
import pytest

from stream.model_topic import ModelAssembler, ModelRecordError, encode_version


def test_a_version_round_trips_in_chunks() -> None:
    rng = np.random.default_rng(0)
    weights = {"items.weight": rng.normal(size=(300, 16)).astype(np.float32), "bias": np.arange(3, dtype=np.float32)}
    records = encode_version(7, weights, {"item_ids": [f"i{k}" for k in range(299)], "alpha": {"buy": 1.0}}, 4096)
    assert len(records) > 4
    assembler = ModelAssembler()
    got = [assembler.add(headers, value) for _, value, headers in [*records[:2], records[1], *records[2:]]]
    assert all(v is None for v in got[:-1])
    version = got[-1]
    assert version.version == 7 and version.meta["item_ids"][-1] == "i298" and version.meta["alpha"] == {"buy": 1.0}
    for name, array in weights.items():
        np.testing.assert_array_equal(version.weights[name], array)


def test_an_unfinished_version_is_dropped_when_the_next_starts() -> None:
    old = encode_version(1, {"w": np.zeros(5000, np.float32)}, {}, 4096)
    new = encode_version(2, {"w": np.ones(10, np.float32)}, {}, 4096)
    assembler = ModelAssembler()
    assert assembler.add(old[0][2], old[0][1]) is None  # its trainer died after one chunk
    done = [assembler.add(h, v) for _, v, h in new]
    assert done[-1].version == 2 and done[-1].weights["w"].sum() == 10


def test_foreign_records_are_refused() -> None:
    with pytest.raises(ModelRecordError):
        ModelAssembler().add([("x", b"1")], b"")
