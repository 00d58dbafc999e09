"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
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


# --- Kafka (stream/testing.py holds the logic) -------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.x loads its protocol schemas with deprecated importlib.resources functions;
    # the warning is attributed to importlib, so the kafka.* filter of pyproject misses it.
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:(open_text|read_text|open_binary|read_binary|path) is deprecated:DeprecationWarning",
    )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap address of the session's Kafka: ``CASM_TEST_BOOTSTRAP`` if set; else a
    testcontainers Kafka when a Docker daemon answers a ping within 3 s and the image starts; else
    the embedded Tansu broker (what our Docker-less machines and CI use)."""
    from stream.testing import session_bootstrap

    with session_bootstrap() as bootstrap:
        yield bootstrap


@pytest.fixture
def kafka_config():
    """KafkaConfig for tests (session timeout 6 s, heartbeat 0.5 s: group joins take ~3 s)."""
    from stream.testing import kafka_test_config

    return kafka_test_config()


@pytest.fixture
def topic_names(request: pytest.FixtureRequest):
    """A TopicsConfig with names unique to this test (4 partitions); topics are not created."""
    from stream.testing import unique_topics

    prefix = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:40].strip("-").lower()
    return unique_topics(prefix=prefix or "t")
