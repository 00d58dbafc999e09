"""docker/ cannot be run here (no Docker engine): check it statically. The compose file parses,
every CASM_ variable it or the Dockerfile sets is a real setting with a valid value, and the
image's command is a real `casm` sub-command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from consumers.cli import build_parser
from consumers.settings import CasmSettings

DOCKER = Path(__file__).resolve().parents[3] / "docker"


def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def dockerfile_env() -> dict[str, str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def casm_variables() -> dict[str, str]:
    found = {k: v for k, v in dockerfile_env().items() if k.startswith("CASM_")}
    for service in compose()["services"].values():
        found.update({k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("CASM_")})
    return found


def setting_exists(name: str) -> bool:
    path = name.removeprefix("CASM_").lower().split("__")
    model = CasmSettings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            model = field.annotation
            if not (isinstance(model, type) and hasattr(model, "model_fields")):
                return False
    return True


def test_compose_parses_with_kafka_kraft_and_the_service() -> None:
    services = compose()["services"]
    assert {"kafka", "casm"} <= set(services)
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["casm"]["build"]["dockerfile"] == "docker/Dockerfile"


def test_every_casm_variable_is_a_real_setting() -> None:
    variables = casm_variables()
    assert len(variables) >= 10
    unknown = [name for name in variables if not setting_exists(name)]
    assert not unknown, f"not settings: {unknown}"
    assert not setting_exists("CASM_KAFKA__BOOTSTRAP") and not setting_exists("CASM_NOPE")


def test_the_variables_validate_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in list(__import__("os").environ) if k.startswith("CASM_")]:
        monkeypatch.delenv(key)
    for key, value in casm_variables().items():
        monkeypatch.setenv(key, value)
    settings = CasmSettings()
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert str(settings.store.path) == "/var/lib/casm/casm.duckdb"


def test_image_command_is_a_casm_sub_command() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    command = re.search(r'^CMD \["([a-z-]+)"', text, re.MULTILINE).group(1)
    assert command in build_parser()._subparsers._group_actions[0].choices
    for package in ("casm_core", "state", "stream", "consumers"):
        assert f"COPY {package} ./{package}" in text
