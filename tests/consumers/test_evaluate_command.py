"""``casm evaluate`` end to end: a planted sequential pattern is learned, and real logs run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from consumers.cli import main

FAST = [
    "--model.hidden-dim", "16", "--model.context-dim", "8", "--model.ffn-dim", "16",
    "--model.max-len", "10", "--model.dropout", "0.0", "--train.batch-size", "64",
    "--progress", "false", "--eval.batch-size", "128",
]


def planted_log(path: Path, num_users: int = 120, num_items: int = 60, length: int = 14, seed: int = 0) -> Path:
    """Every user walks a fixed chain of items (next = item + 1) with views; each third event is
    a buy. The next item is fully predictable from the last one, popularity is flat."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user_id", "item_id", "behavior", "timestamp"])
        t = 0
        for user in range(num_users):
            start = int(rng.integers(0, num_items))
            for step in range(length):
                t += 1
                behaviour = "buy" if step % 3 == 2 else "pv"
                writer.writerow([f"u{user}", f"i{(start + step) % num_items}", behaviour, t])
    return path


def test_casm_learns_a_planted_pattern_and_beats_most_popular(tmp_path: Path) -> None:
    data = planted_log(tmp_path / "planted.csv")
    output = tmp_path / "result.json"
    code = main([
        "evaluate", "--data", str(data), "--variants", "casm,sasrec,mostpop", "--seeds", "0",
        "--behaviours.names", "pv,buy", "--behaviours.alpha", '{"pv": 0.5, "buy": 1.0}',
        "--train.max-epochs", "40", "--train.validate-every", "5", "--train.learning-rate", "0.01",
        "--output", str(output), *FAST,
    ])
    assert code == 0
    result = json.loads(output.read_text())
    summary = result["summary"]
    assert result["evaluated_users"] == 120
    assert summary["casm"]["sampled.hr@10"]["mean"] > 0.9
    assert summary["sasrec"]["sampled.hr@10"]["mean"] > 0.9
    assert summary["mostpop"]["full.hr@10"]["mean"] < 0.5
    for metrics in summary.values():
        for name, value in metrics.items():
            if name != "users":
                assert 0.0 <= value["mean"] <= 1.0


def test_evaluate_reports_unknown_behaviours_clearly(tmp_path: Path) -> None:
    data = planted_log(tmp_path / "planted.csv", num_users=3)
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        main(["evaluate", "--data", str(data), "--behaviours.names", "click,buy", "--behaviours.alpha", "{}", *FAST])


@pytest.mark.parametrize(
    ("name", "preset", "extra"),
    [
        ("taobao_users", "taobao", []),
        ("yelp_khgt", "yelp", ["--heldout", "HELDOUT"]),
    ],
)
def test_evaluate_runs_on_shared_logs(data_dir: Path, tmp_path: Path, name: str, preset: str, extra: list[str]) -> None:
    extra = [str(data_dir / name / "heldout_pos.csv.gz") if e == "HELDOUT" else e for e in extra]
    output = tmp_path / "result.json"
    code = main([
        "evaluate", "--preset", preset, "--data", str(data_dir / name), "--variants", "casm,mostpop",
        "--seeds", "0", "--train.max-epochs", "1", "--output", str(output), *extra, *FAST,
    ])
    assert code == 0
    result = json.loads(output.read_text())
    assert result["evaluated_users"] > 0
    assert 0.0 <= result["summary"]["casm"]["sampled.hr@10"]["mean"] <= 1.0
