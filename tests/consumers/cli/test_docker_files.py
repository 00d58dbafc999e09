"""docker/ cannot be run here (no Docker engine): check it statically. The compose file parses,
every CASM_ variable it or the Dockerfile sets is a real setting with a valid value, the image's
command is a real `casm` sub-command, and the compose file is a scale-out deployment: three ingest
instances and one trainer, each with its own instance id, state volume and metrics port, all on the
kafka service and in one consumer group."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from consumers.cli import build_parser
from consumers.cli.main import command_settings
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


def casm_services() -> dict[str, dict]:
    """The services that run the casm-stream image (built from docker/Dockerfile)."""
    return {name: service for name, service in compose()["services"].items()
            if (service.get("build") or {}).get("dockerfile") == "docker/Dockerfile"}


def service_variables(service: dict) -> dict[str, str]:
    """The CASM_ variables a casm container sees: the Dockerfile's, then the service's."""
    found = {k: v for k, v in dockerfile_env().items() if k.startswith("CASM_")}
    found.update({k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("CASM_")})
    return found


def casm_variables() -> dict[str, str]:
    found: dict[str, str] = {}
    for service in casm_services().values():
        found.update(service_variables(service))
    return found


def role(service: dict) -> str:
    """`scale.role` of a service: its command's --role / --scale.role, else CASM_SCALE__ROLE."""
    command = service.get("command") or []
    command = shlex.split(command) if isinstance(command, str) else command
    for flag in ("--role", "--scale.role"):
        if flag in command:
            return command[command.index(flag) + 1]
    return service_variables(service).get("CASM_SCALE__ROLE", "all")


def serve_has_role_alias() -> bool:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return "--role" in serve._option_string_actions


def clear_casm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in list(os.environ) if k.startswith("CASM_")]:
        monkeypatch.delenv(key)


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
    assert "kafka" in services
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    monitoring = {"prometheus", "grafana"}  # tests/consumers/cli/test_docker_dashboards.py
    assert set(services) - set(casm_services()) == {"kafka"} | monitoring  # every other one runs casm
    for service in casm_services().values():
        assert service["build"]["context"] == ".."
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert service["command"][0] == "serve"


def test_compose_is_three_ingest_instances_and_one_trainer() -> None:
    services = casm_services()
    roles = sorted(role(service) for service in services.values())
    assert roles == ["ingest", "ingest", "ingest", "trainer"]
    variables = [service_variables(service) for service in services.values()]
    ids = [v.get("CASM_SCALE__INSTANCE_ID", "") for v in variables]
    assert all(ids) and len(set(ids)) == len(ids), ids
    volumes = [[v.split(":")[0] for v in service.get("volumes", []) if v.endswith(":/var/lib/casm")]
               for service in services.values()]
    assert all(len(v) == 1 for v in volumes), volumes  # the state folder of each is a volume ...
    assert len({v[0] for v in volumes}) == len(volumes)  # ... of its own
    assert {v[0] for v in volumes} <= set(compose()["volumes"])
    assert {v["CASM_KAFKA__BOOTSTRAP_SERVERS"] for v in variables} == {"kafka:9092"}
    assert len({v["CASM_KAFKA__GROUP_ID"] for v in variables}) == 1  # one consumer group
    for name in ("TOPICS__BEHAVIOURS", "TOPICS__CHANGELOG", "TOPICS__MODELS", "TOPICS__STATUS",
                 "TOPICS__PARTITIONS"):
        assert len({v.get(f"CASM_{name}") for v in variables}) == 1, name  # the same topics
    host_ports = [port.rsplit(":", 2)[-2] for service in services.values() for port in service["ports"]]
    container_ports = {port.rsplit(":", 1)[-1] for service in services.values() for port in service["ports"]}
    assert len(host_ports) == len(services) and len(set(host_ports)) == len(host_ports)  # distinct
    assert container_ports == {v["CASM_SERVE__METRICS_PORT"] for v in variables}


@pytest.mark.skipif(not serve_has_role_alias(), reason="`casm serve --role` (alias of --scale.role) is absent")
def test_each_service_command_and_environment_make_its_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, service in casm_services().items():
        clear_casm_environment(monkeypatch)
        for key, value in service_variables(service).items():
            monkeypatch.setenv(key, value)
        settings, _ = command_settings(build_parser().parse_args(service["command"]))
        assert settings.scale.role == role(service), name
        assert settings.scale.instance_id == service_variables(service)["CASM_SCALE__INSTANCE_ID"]


def test_every_casm_variable_is_a_real_setting() -> None:
    variables = casm_variables()
    assert len(variables) >= 10
    unknown = [name for name in variables if not setting_exists(name)]
    assert not unknown, f"not settings: {unknown}"
    assert not setting_exists("CASM_KAFKA__BOOTSTRAP") and not setting_exists("CASM_NOPE")


def test_the_variables_validate_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for service in casm_services().values():
        clear_casm_environment(monkeypatch)
        for key, value in service_variables(service).items():
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
