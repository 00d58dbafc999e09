"""Start-up failures as one line that says what to change.

`explain(exc, settings)` turns the errors a command meets while it starts (the metrics port in use,
the state file locked by another process, the Kafka cluster unreachable, a setting Kafka rejects)
into one sentence naming the setting (command-line option and environment variable); None for
anything else (a bug: the traceback is the useful report). `main` in `consumers.cli` prints it and
exits non-zero; with ``--log-level DEBUG`` it logs the traceback too.
"""

from __future__ import annotations

import errno

from kafka.errors import KafkaConfigurationError, KafkaTimeoutError
from pydantic import ValidationError

from consumers.settings import CasmSettings
from state.errors import SchemaVersionError, StoreLockedError
from stream.broker import BrokerError

EXIT_STARTUP = 3
"""Exit status of a command that could not start (2 is argparse's, for bad options)."""


def option(path: str) -> str:
    """``serve.metrics_port`` -> ``--serve.metrics-port (CASM_SERVE__METRICS_PORT)``."""
    section, _, name = path.partition(".")
    flag = f"--{section}.{name.replace('_', '-')}" if name else f"--{section.replace('_', '-')}"
    env = "CASM_" + "__".join(part.upper() for part in path.split("."))
    return f"{flag} ({env})"


def invalid_settings(exc: ValidationError) -> str:
    """One line for a settings ValidationError: every bad field with its message and option."""
    parts = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int))
        parts.append(f"{path or 'settings'}: {err['msg']}" + (f" (set {option(path)})" if "." in path else ""))
    return "invalid settings: " + "; ".join(parts)


def explain(exc: BaseException, settings: CasmSettings | None) -> str | None:
    """What to change, in one line, for a known start-up failure; None otherwise."""
    if isinstance(exc, ValidationError):
        return invalid_settings(exc)
    if isinstance(exc, StoreLockedError):
        return f"{exc}: stop the other `casm` process that uses it, or set {option('store.path')} to another file"
    if isinstance(exc, SchemaVersionError):
        return f"{exc} (set {option('store.path')} to another file, or upgrade casm-stream)"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        where = "" if settings is None else f" {settings.serve.metrics_host}:{settings.serve.metrics_port}"
        return (f"the metrics port{where} is in use (another `casm serve`?): set {option('serve.metrics_port')} "
                "to a free port (0: any free one)")
    if isinstance(exc, KafkaTimeoutError) and settings is not None:
        servers = settings.kafka.bootstrap_servers or "the embedded broker"
        return (f"cannot reach the Kafka cluster at {servers} ({type(exc).__name__}: {exc}): check "
                f"{option('kafka.bootstrap_servers')} and {option('kafka.security_protocol')}, or leave the "
                "servers empty to start the embedded broker")
    if isinstance(exc, BrokerError):
        return f"the embedded broker did not start: {exc} (see {option('broker.port')} and {option('broker.binary')})"
    if isinstance(exc, KafkaConfigurationError):
        return f"Kafka rejected a setting: {exc} (see the kafka.* settings, `casm serve --help`)"
    return None
