"""The README's main job, `casm demo`, run as a user would (the console script, default
settings, embedded broker) with a small event count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EVENTS = 4_000


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
    assert (runs[0] / "report.md").read_text().startswith("# casm demo report")
