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
        "--train.max-steps", "80", "--train.validate-every-steps", "10", "--train.warmup-steps", "5",
        "--train.learning-rate", "0.01",
        "--output", str(output), *FAST,
    ])
    assert code == 0
    result = json.loads(output.read_text())
    summary = result["summary"]
    assert result["evaluated_users"] == 120
    assert summary["casm"]["sampled.hr@10"]["mean"] > 0.9
    assert summary["sasrec"]["sampled.hr@10"]["mean"] > 0.9
    assert summary["mostpop"]["full.hr@10"]["mean"] < 0.5
    against = result["differences"]["baseline"]["casm"]["sampled.hr@10"]
    assert against["against"] == "mostpop" and against["excludes_zero"] and against["low"] > 0
    assert set(result["differences"]["reference"]) == {"casm"}  # against sasrec
    for metrics in summary.values():  # NDCG never exceeds HR at the same K
        assert metrics["sampled.ndcg@10"]["mean"] <= metrics["sampled.hr@10"]["mean"]
        assert metrics["full.ndcg@10"]["mean"] <= metrics["full.hr@10"]["mean"]


def variants_with_recent(path: Path) -> Path:
    """A variants file of the two baselines (the --variants-file option)."""
    path.write_text(
        '[mostpop]\ndescription = "most popular"\nkind = "mostpop"\n'
        '[recent]\ndescription = "recent items"\nkind = "recent"\n'
    )
    return path


BASELINE_ARGS = ["--variants", "mostpop,recent", "--seeds", "0,1", "--behaviours.names", "pv,buy",
                 "--behaviours.alpha", '{"pv": 0.5, "buy": 1.0}', "--eval.bootstrap-replicates", "50"]


def test_baselines_keep_ranks_validation_and_intervals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = planted_log(tmp_path / "planted.csv", num_users=40)
    output = tmp_path / "result.json"
    code = main([
        "evaluate", "--data", str(data), "--variants-file", str(variants_with_recent(tmp_path / "v.toml")),
        "--eval.full-exclude-history", "true", "--output", str(output), *BASELINE_ARGS, *FAST,
    ])
    assert code == 0
    result = json.loads(output.read_text())
    assert [run["variant"] for run in result["runs"]] == ["mostpop", "recent"]  # baselines: one seed
    assert result["eval"]["full_exclude_history"] is True
    assert "before the case" in result["protocol"]["full_ranking"]
    cases = result["evaluated_users"]
    assert cases == 40 and len(result["test_cases"]["user_id"]) == len(result["test_cases"]["item_id"]) == cases
    for run in result["runs"]:
        assert len(run["ranks"]["sampled"]) == len(run["ranks"]["full"]) == cases
        assert run["validation"]["users"] == 40.0 and "full.ndcg@10" in run["validation"]
        hr = result["summary"][run["variant"]]["sampled.hr@10"]
        assert hr["low"] <= hr["mean"] <= hr["high"]
    assert result["differences"] == {"baseline": {}, "reference": {}}
    printed = capsys.readouterr().out
    assert "| recent | 40 |" in printed and "before the case" in printed


def test_time_cut_split_tests_every_target_event_after_the_cut(tmp_path: Path) -> None:
    data = planted_log(tmp_path / "planted.csv", num_users=40)
    output = tmp_path / "result.json"
    code = main([
        "evaluate", "--data", str(data), "--variants-file", str(variants_with_recent(tmp_path / "v.toml")),
        "--eval.split", "time_cut", "--output", str(output), *BASELINE_ARGS, *FAST,
    ])
    assert code == 0
    result = json.loads(output.read_text())
    assert result["evaluated_users"] > result["evaluated_distinct_users"] > 0
    assert "time cut" in result["protocol"]["split"]
    heldout = tmp_path / "heldout.csv"
    heldout.write_text("user_id,item_id\nu0,i1\n")
    with pytest.raises(SystemExit, match="time_cut"):
        main(["evaluate", "--data", str(data), "--heldout", str(heldout), "--eval.split", "time_cut",
              *BASELINE_ARGS, *FAST])


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
        "--seeds", "0", "--train.max-steps", "2", "--output", str(output), *extra, *FAST,
    ])
    assert code == 0
    result = json.loads(output.read_text())
    assert result["evaluated_users"] > 0
    casm = result["summary"]["casm"]
    assert casm["sampled.ndcg@10"]["mean"] <= casm["sampled.hr@10"]["mean"]
    assert casm["full.ndcg@10"]["mean"] <= casm["full.hr@10"]["mean"]
    assert len(result["test_cases"]["user_id"]) == result["evaluated_users"]


def test_merge_joins_runs_of_one_split_and_refuses_others(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = planted_log(tmp_path / "planted.csv", num_users=40)
    variants = str(variants_with_recent(tmp_path / "v.toml"))
    parts = []
    for name in ("mostpop", "recent"):
        parts.append(tmp_path / f"{name}.json")
        assert main(["evaluate", "--data", str(data), "--variants-file", variants, "--output", str(parts[-1]),
                     *BASELINE_ARGS, "--variants", name, *FAST]) == 0
    merged = tmp_path / "merged.json"
    assert main(["evaluate", "--merge", *map(str, parts), "--output", str(merged)]) == 0
    result = json.loads(merged.read_text())
    assert sorted(result["summary"]) == ["mostpop", "recent"] and len(result["runs"]) == 2
    alone = json.loads(parts[1].read_text())
    assert result["summary"]["recent"] == alone["summary"]["recent"]
    assert "Validation" in capsys.readouterr().out
    other = tmp_path / "other.json"
    assert main(["evaluate", "--data", str(planted_log(tmp_path / "p2.csv", num_users=30)), "--variants-file",
                 variants, "--output", str(other), *BASELINE_ARGS, "--variants", "recent", *FAST]) == 0
    with pytest.raises(SystemExit, match="other test cases"):
        main(["evaluate", "--merge", str(parts[0]), str(other), "--output", str(tmp_path / "bad.json")])
