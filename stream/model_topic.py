"""Model versions on a topic: the trainer publishes, every ingest instance loads.

A version is one payload, an uncompressed ``.npz`` (numpy's zip of arrays, read without pickle)
holding the weights and a ``__meta__`` array (UTF-8 JSON: version, item vocabulary in index
order, behaviour names, alpha, publication time, ...), cut into records of at most
`chunk_bytes`. Every record carries the headers ``casm.model`` (format version),
``model.version``, ``model.chunk`` and ``model.chunks``; the key is the version. The topic has
one partition and one trainer writes it, so a version's chunks are consecutive; a reader keeps the
newest complete version (`ModelAssembler`). A retried chunk may arrive twice: the assembler keys
chunks by number.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = b"1"
FORMAT_HEADER = "casm.model"
META_KEY = "__meta__"


class ModelRecordError(ValueError):
    """A record of the models topic this version cannot read."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version: `weights` (name -> array) and `meta` (JSON-able dict, with at least
    ``version``)."""

    version: int
    weights: dict[str, np.ndarray]
    meta: dict[str, Any]
    payload_bytes: int


def encode_version(
    version: int, weights: Mapping[str, np.ndarray], meta: Mapping[str, Any], chunk_bytes: int
) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """The records (key, value, headers) of one version, in order."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    if META_KEY in weights:
        raise ValueError(f"a weight may not be called {META_KEY}")
    meta_bytes = json.dumps({**meta, "version": int(version)}).encode()
    sink = io.BytesIO()
    np.savez(sink, **dict(weights), **{META_KEY: np.frombuffer(meta_bytes, dtype=np.uint8)})
    payload = sink.getvalue()
    chunks = [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]
    key = str(int(version)).encode()
    return [
        (key, chunk, [(FORMAT_HEADER, FORMAT_VERSION), ("model.version", key),
                      ("model.chunk", str(k).encode()), ("model.chunks", str(len(chunks)).encode())])
        for k, chunk in enumerate(chunks)
    ]


def decode_payload(payload: bytes) -> ModelVersion:
    """A whole payload back into its version."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays.pop(META_KEY).tobytes().decode())
    return ModelVersion(int(meta["version"]), arrays, meta, len(payload))


class ModelAssembler:
    """Collects chunks record by record; `add` returns a version once its last chunk arrived."""

    def __init__(self) -> None:
        self._version: int | None = None
        self._chunks: dict[int, bytes] = {}
        self._count = 0

    def add(self, headers: list[tuple[str, bytes]] | None, value: bytes) -> ModelVersion | None:
        """One record (its headers and value).

        Raises:
            ModelRecordError: a record without the model headers or of another format version.
        """
        found = dict(headers or [])
        if found.get(FORMAT_HEADER) != FORMAT_VERSION:
            raise ModelRecordError(f"not a model record of format {FORMAT_VERSION.decode()} (headers {sorted(found)})")
        try:
            version = int(found["model.version"])
            chunk, count = int(found["model.chunk"]), int(found["model.chunks"])
        except (KeyError, ValueError) as exc:
            raise ModelRecordError(f"model record headers {sorted(found)}: {exc}") from exc
        if version != self._version:
            # A new version starts (an unfinished older one was cut off: its trainer died).
            self._version, self._chunks, self._count = version, {}, count
        self._chunks[chunk] = value
        if len(self._chunks) < self._count:
            return None
        payload = b"".join(self._chunks[k] for k in range(self._count))
        self._version, self._chunks = None, {}
        return decode_payload(payload)
