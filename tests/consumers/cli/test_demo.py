"""The README's main job, `casm demo`, run as a user would (the console script, default
settings, embedded broker) with a small event count: it prints the dashboard URL, reports, and
writes the four plots of a live run beside report.md, which links them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.evaluation.stream_report import PLOT_FILES

pytestmark = pytest.mark.integration

EVENTS = 4_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_casm_demo_completes_and_reports(tmp_path: Path) -> None:
    casm = Path(sys.executable).with_name("casm")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASM_")}
    env.update({
        "CASM_LIVE__DEMO_EVENTS": str(EVENTS),
        "CASM_LIVE__RUNS_DIR": str(tmp_path / "runs"),
        "CASM_SERVE__METRICS_PORT": "0",
        "CASM_SERVE__PUBLISH_EVERY_S": "1.0",  # versions during a short run
        "CASM_PROGRESS": "false",
    })
    result = subprocess.run([str(casm), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "# casm demo report" in result.stdout
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    report = json.loads((runs[0] / "report.json").read_text())
    assert report["synthetic"] and report["drained"]
    assert report["serve"]["events_applied"] == EVENTS
    assert report["monitor"]["users_not_reflected"] == 0
    assert report["prequential"]["freshness_count"] > 0
    pq = report["prequential"]
    assert pq["scored"] + pq["cold"] == pq["target_events"] > 0
    assert 0.0 < pq["ndcg@10"] <= pq["hr@10"]  # some buys hit; NDCG never exceeds HR at the same K
    markdown = (runs[0] / "report.md").read_text()
    assert markdown.startswith("# casm demo report")
    dashboard = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("dashboard ")]
    assert len(dashboard) == 1, result.stdout[:3000]
    assert re.fullmatch(r"dashboard http://127\.0\.0\.1:[1-9][0-9]*/", dashboard[0]), dashboard
    for name in PLOT_FILES.values():
        plot = runs[0] / name
        assert plot.stat().st_size > len(PNG_SIGNATURE), name
        assert plot.read_bytes().startswith(PNG_SIGNATURE), name
        assert f"]({name})" in markdown, name  # a markdown image link
        assert name in result.stdout, name
    assert set(report["plots"].values()) == set(PLOT_FILES.values())
