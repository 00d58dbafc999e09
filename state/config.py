"""Configuration of the DuckDB state store."""

from __future__ import annotations

from pathlib import Path

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
    recent_fraction: float = Field(
        0.8, ge=0.0, le=1.0,
        description="Share of a training sample drawn from recently touched users; the rest is "
        "uniform over all users so fine-tuning does not forget.",
    )
    threads: int = Field(0, ge=0, description="DuckDB threads (0: DuckDB's default).")
    memory_limit: str | None = Field(None, description="DuckDB memory_limit, e.g. '2GB'.")
