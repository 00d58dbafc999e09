"""Fixtures shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``CASM_DATA_DIR`` or ``../shared/data`` next to the repository."""
    configured = os.environ.get("CASM_DATA_DIR")
    return Path(configured) if configured else (REPO_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real logs; skips (or fails under CI=true) when they are absent."""
    path = shared_data_dir()
    if not path.is_dir():
        message = f"shared data folder {path} is absent (set CASM_DATA_DIR)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    return path
