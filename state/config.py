"""Configuration of the DuckDB state store."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StoreConfig(BaseModel):
    """Where the state lives and how much of it is kept."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    path: Path = Field(Path("var/casm.duckdb"), description="DuckDB file (':memory:' for tests).")
    sequence_length: int = Field(
        64, ge=2, description="Events N kept in each user's rolling sequence (>= model.max_len + 1)."
    )
    retention_days: float | None = Field(
        None, gt=0, description="Trim applied events older than this (event time); None keeps all."
    )
    retention_rows: int | None = Field(
        None, ge=1, description="Keep at most this many newest applied events; None keeps all."
    )
    event_id_window_s: float = Field(
        86_400.0, gt=0,
        description="Seconds (wall clock, since applied) an applied event_id is remembered to drop "
        "producer retries; costs 16 bytes of memory per remembered id.",
    )
    fold_events: int = Field(
        200_000, ge=1,
        description="Applied events kept outside the per-user snapshot table before it is folded "
        "(bounds the replay when the file is opened).",
    )
    threads: int = Field(0, ge=0, description="DuckDB threads (0: DuckDB's default).")
    memory_limit: str | None = Field(None, description="DuckDB memory_limit, e.g. '2GB'.")
    fsync_mode: Literal["STANDARD", "NONE", "FULL"] = Field(
        "STANDARD",
        description="DuckDB fsync_mode: STANDARD syncs the WAL at every commit (an apply survives "
        "power loss); NONE leaves it to the OS: process crashes stay exactly-once, an OS crash "
        "may corrupt the file; FULL uses fullfsync on macOS.",
    )
    checkpoint_threshold: str | None = Field(
        None, description="DuckDB checkpoint_threshold (WAL size that triggers a checkpoint, e.g. "
        "'16MB'); None keeps DuckDB's default."
    )
