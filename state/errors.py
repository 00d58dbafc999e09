"""Typed errors of the state store. Every error the store raises on purpose is a `StoreError`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StoreError(Exception):
    """Base class of the state store's errors."""


class InvalidEventError(StoreError, ValueError):
    """A batch handed to the store is malformed; nothing of it was written.

    Attributes:
        reasons: one human-readable reason per offending row (or one for the whole batch).
        rows: 0-based row positions (in the input table) of the offending rows, int64 [k];
            empty when the problem concerns the whole batch (a missing column, bad offsets map).
    """

    def __init__(self, message: str, *, rows: Sequence[int] = (), reasons: Sequence[str] = ()):
        super().__init__(message)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.reasons = list(reasons)


class StoreLockedError(StoreError):
    """Another writer holds the DuckDB file (one writer process per file)."""

    def __init__(self, path: str, detail: str = ""):
        message = (
            f"state file {path} is in use by another writer"
            + (f" ({detail})" if detail else "")
            + "; DuckDB allows one writer per file: stop the other process or use another file"
        )
        super().__init__(message)
        self.path = path


class SchemaVersionError(StoreError):
    """The file's schema cannot be used by this code (newer than the code, or needs an upgrade
    that a read-only open cannot make)."""


class ConfigMismatchError(StoreError):
    """The file was written with settings that contradict the ones given (e.g. the behaviour
    vocabulary in another order)."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened read-only."""


class StoreClosedError(StoreError):
    """The store was used after `close()`."""


class RegistryError(StoreError):
    """The model registry refused a write (e.g. a model version that already exists)."""

