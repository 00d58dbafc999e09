"""The DuckDB state store of casm-stream: applied events, rolling user sequences, vocabularies,
Kafka offsets, the model registry and logs, applied exactly once (see `state.store`)."""

from state.config import StoreConfig
from state.errors import (
    ConfigMismatchError,
    InvalidEventError,
    ReadOnlyStoreError,
    RegistryError,
    SchemaVersionError,
    StoreClosedError,
    StoreError,
    StoreLockedError,
)
from state.events import ApplyResult, UserActivity
from state.schema import SCHEMA_VERSION
from state.sequences import Sequences
from state.store import StateStore

__all__ = [
    "SCHEMA_VERSION",
    "ApplyResult",
    "ConfigMismatchError",
    "InvalidEventError",
    "ReadOnlyStoreError",
    "RegistryError",
    "SchemaVersionError",
    "Sequences",
    "StateStore",
    "StoreClosedError",
    "StoreConfig",
    "StoreError",
    "StoreLockedError",
    "UserActivity",
]
