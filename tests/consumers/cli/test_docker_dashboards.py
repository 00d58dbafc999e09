"""docker/'s monitoring, checked statically (no Docker engine here): the compose file runs
Prometheus and Grafana with their configuration mounted from files that exist; Prometheus scrapes
every casm instance of the compose file on its metrics port; Grafana provisions the Prometheus data
source and a dashboard whose every panel queries metrics the service really exposes (the names in
`ServiceMetrics(...).render()`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from consumers.telemetry import ServiceMetrics
from tests.consumers.cli.test_docker_files import DOCKER, casm_services, compose, service_variables

GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
RATE_WINDOW_S = 5.0  # any window: only the metric names matter here
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\bcasm_[a-z0-9_]+\b")


def mounts(service: dict) -> dict[str, Path]:
    """A service's bind mounts: container path -> host path (relative to the compose file)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = (DOCKER / source).resolve()
    return found


def exposed_metric_names() -> set[str]:
    """Every series name the service's /metrics can carry, from its exposition text: the families'
    names (counters with `_total`, as rendered) and a histogram's `_bucket/_sum/_count`."""
    metrics = ServiceMetrics(RATE_WINDOW_S)
    stats = {"sent": {"recommendations": 1}, "acknowledged": {"recommendations": 1},
             "failed": {"recommendations": 0}, "given_up": {"recommendations": 0}}
    metrics.watch_delivery(lambda: stats, lambda: 0)
    names: set[str] = set()
    for line in metrics.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.update([name + suffix for suffix in HISTOGRAM_SUFFIXES] if kind == "histogram" else [name])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def dashboard() -> dict:
    return json.loads((DOCKER / "grafana" / "dashboards" / "casm.json").read_text())


def test_compose_runs_prometheus_and_grafana_with_mounted_configuration() -> None:
    services = compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for service in (prometheus, grafana):
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+\.\d+", service["image"]), service["image"]  # pinned
        assert all(path.exists() for path in mounts(service).values()), mounts(service)
    assert mounts(prometheus)[PROMETHEUS_CONFIG] == DOCKER / "prometheus" / "prometheus.yml"
    provisioning = mounts(grafana)[GRAFANA_PROVISIONING]
    assert (provisioning / "datasources" / "prometheus.yml").is_file()
    assert (provisioning / "dashboards" / "casm.yml").is_file()
    assert "GF_INSTALL_PLUGINS" not in (grafana.get("environment") or {})  # no external plugins
    assert "9090" in " ".join(prometheus["ports"]) and "3000" in " ".join(grafana["ports"])


def test_prometheus_scrapes_every_casm_instance_on_its_metrics_port() -> None:
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    targets = {target for job in config["scrape_configs"] if job.get("metrics_path", "/metrics") == "/metrics"
               for group in job["static_configs"] for target in group["targets"]}
    ports = {service_variables(service)["CASM_SERVE__METRICS_PORT"] for service in casm_services().values()}
    assert ports == {"9464"}
    assert targets == {f"{name}:9464" for name in casm_services()}


def test_grafana_provisions_the_datasource_and_the_dashboard_folder() -> None:
    grafana = compose()["services"]["grafana"]
    provisioning = mounts(grafana)[GRAFANA_PROVISIONING]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(d["type"], d["url"]) for d in datasources] == [("prometheus", "http://prometheus:9090")]
    providers = yaml.safe_load((provisioning / "dashboards" / "casm.yml").read_text())["providers"]
    assert [p["type"] for p in providers] == ["file"]
    assert mounts(grafana)[providers[0]["options"]["path"]] == DOCKER / "grafana" / "dashboards"
    uids = {d["uid"] for d in datasources}
    for panel in dashboard()["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]


def test_every_dashboard_panel_queries_metrics_the_service_exposes() -> None:
    exposed = exposed_metric_names()
    assert {"casm_events_per_second", "casm_freshness_seconds_bucket", "casm_dead_letters_total",
            "casm_produce_acknowledged_total", "casm_produce_failed_total"} <= exposed
    panels = dashboard()["panels"]
    used: set[str] = set()
    for panel in panels:
        expressions = [target["expr"] for target in panel.get("targets", [])]
        assert expressions and all(expressions), panel["title"]
        for expression in expressions:
            names = set(METRIC_NAME.findall(expression))
            assert names, expression
            assert names <= exposed, f"{panel['title']}: not exposed {sorted(names - exposed)}"
            used |= names
    for wanted in ("casm_events_per_second", "casm_consumer_lag", "casm_freshness_seconds_bucket",
                   "casm_model_version", "casm_alpha", "casm_drift_detections_total", "casm_dead_letters_total",
                   "casm_trainer_steps_per_second", "casm_train_loss_by_behaviour",
                   "casm_produce_acknowledged_total", "casm_produce_failed_total", "casm_restored_events_total"):
        assert wanted in used, wanted
    assert len({panel["id"] for panel in panels}) == len(panels)


def test_the_metric_name_check_rejects_unknown_names() -> None:
    exposed = exposed_metric_names()
    assert "casm_events_applied" not in exposed  # a counter is exposed with `_total` only
    assert "casm_freshness_seconds" not in exposed  # a histogram as its bucket, sum and count series
    assert "casm_events_applied_total" in exposed and "casm_freshness_seconds_count" in exposed
