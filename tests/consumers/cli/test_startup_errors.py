"""Start-up failures of `casm serve` print one line naming what to change and exit non-zero; no
traceback unless --log-level DEBUG."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.serve.service import open_store
from consumers.settings import CasmSettings

pytestmark = pytest.mark.integration

TIMEOUT_S = 120


def serve(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "consumers.cli", "serve", "--idle-exit-s", "1",
         "--store.path", str(tmp_path / "state.duckdb"), "--serve.checkpoint-dir", str(tmp_path / "ckpt"),
         "--progress", "false", *extra],
        env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=TIMEOUT_S,
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("casm")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, "--serve.metrics-port", str(port))
    assert result.returncode == 3
    line = one_line(result)
    assert f"127.0.0.1:{port}" in line and "--serve.metrics-port" in line and "CASM_SERVE__METRICS_PORT" in line


def test_store_locked(tmp_path: Path) -> None:
    settings = CasmSettings(store={"path": tmp_path / "state.duckdb"}, progress=False)
    store = open_store(settings)
    try:
        result = serve(tmp_path, "--serve.metrics-port", "0")
    finally:
        store.close()
    assert result.returncode == 3
    assert "in use by another writer" in one_line(result) and "--store.path" in one_line(result)


@pytest.mark.slow  # the Kafka client gives up on bootstrapping after about 30 s
def test_broker_unreachable(tmp_path: Path) -> None:
    result = serve(tmp_path, "--serve.metrics-port", "0", "--kafka.bootstrap-servers", "127.0.0.1:1",
                   "--kafka.request-timeout-ms", "1000")
    assert result.returncode == 3
    line = one_line(result)
    assert "cannot reach the Kafka cluster at 127.0.0.1:1" in line and "--kafka.bootstrap-servers" in line


def test_bad_setting(tmp_path: Path) -> None:
    result = serve(tmp_path, "--serve.metrics-port", "70000")
    assert result.returncode == 2
    line = one_line(result)
    assert "serve.metrics_port" in line and "--serve.metrics-port" in line


def test_the_traceback_comes_with_debug_logging(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = serve(tmp_path, "--serve.metrics-port", str(taken.getsockname()[1]), "--log-level", "DEBUG")
    assert result.returncode == 3 and "Traceback" in result.stderr
