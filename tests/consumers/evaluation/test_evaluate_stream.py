"""`casm evaluate-stream` through the production path on small logs: the report is complete and
consistent, and a log where every user re-buys the same item is learned (HR@10 close to 1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from consumers.cli import main

pytestmark = pytest.mark.integration

FAST = [
    "--model.hidden-dim", "16", "--model.context-dim", "8", "--model.ffn-dim", "16", "--model.max-len", "10",
    "--model.dropout", "0.0", "--store.sequence-length", "11", "--train.learning-rate", "0.01",
    "--serve.deterministic-round-events", "300", "--serve.deterministic-steps-per-1000-events", "66", "--serve.metrics-port", "0",
    "--live.window-events", "300", "--progress", "false",
]


def rebuy_log(path: Path, users: int = 40, rounds: int = 40, seed: int = 0) -> tuple[Path, int]:
    """Each user buys their own favourite item again and again, users interleaved at random. The
    favourites are equally popular, so the most-popular list holds a quarter of them."""
    rng = np.random.default_rng(seed)
    rows, t = [], 1.6e9
    for _ in range(rounds):
        for u in rng.permutation(users):
            t += 1
            rows.append((f"u{u}", f"fav{u}", "buy", t))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "behavior", "timestamp"])
        writer.writerows(rows)
    return path, users * rounds


def test_rebuy_log_is_learned_and_the_report_is_consistent(tmp_path: Path) -> None:
    data, buys = rebuy_log(tmp_path / "rebuy.csv")
    report_dir = tmp_path / "report"
    code = main(["evaluate-stream", "--data", str(data), "--report-dir", str(report_dir), *FAST])
    assert code == 0
    for name in ("report.md", "metrics.json", "hr_over_time.png", "freshness.png", "alpha.png", "throughput.png"):
        assert (report_dir / name).stat().st_size > 0, name
    metrics = json.loads((report_dir / "metrics.json").read_text())
    pq, tt = metrics["prequential"], metrics["test_then_train"]
    assert metrics["drained"] and metrics["serve"]["events_applied"] == buys
    # Every target event of the log is scored, or counted cold (no list before it).
    assert pq["target_events"] == buys and pq["scored"] == buys - pq["cold"]
    assert 40 <= pq["cold"] <= 120  # each user's first buy, and those in the same first poll
    assert pq["mrr"] <= pq["ndcg@10"] <= pq["hr@10"]
    # Ranked against 99 sampled items, an item is in the top 10 at least as often as against every item.
    assert tt["full"]["hr@10"] <= tt["sampled"]["hr@10"] and tt["full"]["n"] == tt["sampled"]["n"] > 0
    # After warm-up the published lists hold the favourite.
    late = [w for w in pq["by_window"] if w["start"] >= 1_200]
    assert late and min(w["hr@10"] for w in late) > 0.9, pq["by_window"]
    assert "Stream evaluation" in (report_dir / "report.md").read_text()


def test_the_recent_baseline_recommends_what_users_rebuy_and_has_no_model(tmp_path: Path) -> None:
    data, buys = rebuy_log(tmp_path / "rebuy.csv", users=10, rounds=8)
    report_dir = tmp_path / "report"
    assert main(["evaluate-stream", "--data", str(data), "--recommender", "recent", "--report-dir", str(report_dir), *FAST]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    pq = metrics["prequential"]
    assert metrics["recommender"] == "recent" and not metrics["has_model"]
    assert metrics["serve"]["fine_tunes"] == 0 and metrics["test_then_train"]["sampled"]["n"] == 0
    assert set(metrics["monitor"]["sources"]) <= {"recent", "popularity"}
    assert pq["scored"] > 0 and pq["by_source"]["recent"]["hr@10"] == 1.0  # the favourite is in the window
    assert "recommender `recent` has no model to rank with" in (report_dir / "report.md").read_text()


def _comparable(metrics: dict) -> dict:
    """What two runs of one log must agree on exactly: every metric of the published lists and
    of the test-then-train ranks, the model versions and the trainer's steps."""
    training = [{k: v for k, v in row.items() if k in ("version", "steps", "steps_total", "events_applied", "loss")}
                for row in metrics["serve"]["training"]]
    pq = {k: v for k, v in metrics["prequential"].items() if not k.startswith("freshness")}
    return {"prequential": pq, "test_then_train": metrics["test_then_train"], "training": training,
            "versions": metrics["monitor"]["model_versions"]}


def test_deterministic_training_gives_identical_metrics_on_two_runs(tmp_path: Path) -> None:
    data, _ = rebuy_log(tmp_path / "rebuy.csv", users=30, rounds=20, seed=4)
    runs = []
    for name in ("a", "b"):
        report_dir = tmp_path / name
        args = ["evaluate-stream", "--data", str(data), "--max", "--report-dir", str(report_dir), *FAST,
                "--serve.deterministic-round-events", "100"]
        assert main(args) == 0
        runs.append(json.loads((report_dir / "metrics.json").read_text()))
    a, b = (_comparable(m) for m in runs)
    assert len(a["training"]) >= 4 and a["test_then_train"]["full"]["n"] > 100  # trained and ranked
    assert a == b


@pytest.mark.slow
def test_two_full_speed_runs_of_the_synthetic_stream_agree_exactly(tmp_path: Path) -> None:
    """At --max (deterministic training, fixed batches, lockstep with the publisher) nothing that
    is scored depends on timing: a longer stream with drift signals agrees to the last digit."""
    runs = []
    for name in ("a", "b"):
        report_dir = tmp_path / name
        args = ["evaluate-stream", "--synthetic", "--synthetic.n-events", "4000", "--synthetic.seed", "3",
                "--report-dir", str(report_dir), *FAST]
        assert main(args) == 0
        runs.append(json.loads((report_dir / "metrics.json").read_text()))
    a, b = runs
    assert a["prequential"]["target_events"] == b["prequential"]["target_events"]
    assert a["prequential"]["hr@10"] > 0.05 and a["test_then_train"]["sampled"]["hr@10"] > 0.3  # learned something
    assert _comparable(a) == _comparable(b)
