"""Dead letters always fit under the producer's request limit, with the cut recorded."""

from __future__ import annotations

import hashlib

from stream.deadletters import RECORD_OVERHEAD_BYTES, fit
from stream.models import DeadLetter


def letter(original: bytes, key: bytes | None = None) -> DeadLetter:
    return DeadLetter(topic="behaviours", partition=1, offset=7, key=key, original=original,
                      original_size=len(original), original_sha256=hashlib.sha256(original).hexdigest(),
                      kind="invalid_json", reason="bad", dead_at=0.0)


def test_a_small_dead_letter_is_unchanged() -> None:
    small = letter(b"{oops")
    assert fit(small, 1_048_576) is small


def test_an_oversize_dead_letter_is_cut_to_fit_keeping_size_and_hash() -> None:
    original = bytes(range(256)) * 8_000  # 2 MB
    key = b"k" * 1024
    cut = fit(letter(original, key), 1_048_576)
    assert len(cut.to_json_bytes()) + len(key) <= 1_048_576 - RECORD_OVERHEAD_BYTES
    assert cut.truncated and original.startswith(cut.original) and len(cut.original) > 700_000
    assert cut.original_size == len(original) and cut.original_sha256 == hashlib.sha256(original).hexdigest()
    assert (cut.topic, cut.partition, cut.offset, cut.reason) == ("behaviours", 1, 7, "bad")
