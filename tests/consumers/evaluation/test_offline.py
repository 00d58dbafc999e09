"""The offline harness's pieces: timestamps in the encoded log, variant kinds, bootstrap summaries,
paired comparisons against the best baseline and the reference, tables and the JSON layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from casm_core.config import EvalConfig
from casm_core.metrics import summarize
from consumers.evaluation.offline import (
    aggregate,
    compare,
    describe_protocol,
    dumps_result,
    encode_log,
    format_differences,
    format_table,
    load_variants,
)

MISS = 100


def test_encode_log_keeps_timestamps_when_the_table_has_them() -> None:
    table = pa.table({
        "user_id": ["a", "b", "a"], "item_id": ["x", "y", "y"], "behavior": ["pv", "buy", "buy"],
        "timestamp": [1.0, 2.5, 4.0],
    })
    encoded = encode_log(table, ["pv", "buy"])
    assert encoded.events.timestamps.dtype == np.float64
    assert encoded.events.timestamps.tolist() == [1.0, 2.5, 4.0]
    assert encode_log(table.drop(["timestamp"]), ["pv", "buy"]).events.timestamps is None


def test_load_variants_knows_the_baseline_kinds(tmp_path: Path) -> None:
    path = tmp_path / "variants.toml"
    path.write_text('[recent]\ndescription = "r"\nkind = "recent"\n[pop]\ndescription = "p"\nkind = "mostpop"\n')
    assert {v.kind for v in load_variants(path).values()} == {"recent", "mostpop"}
    path.write_text('[x]\ndescription = "x"\nkind = "knn"\n')
    with pytest.raises(ValueError, match="unknown variant kinds"):
        load_variants(path)


def run_of(variant: str, kind: str, seed: int, sampled: np.ndarray, full: np.ndarray) -> dict[str, Any]:
    """A run as `run_variant` returns it (metrics from the ranks)."""
    test = {**summarize(sampled, [10], "sampled."), **summarize(full, [10], "full."), "users": float(sampled.size)}
    return {
        "variant": variant, "kind": kind, "seed": seed, "test": test,
        "ranks": {"sampled": sampled.tolist(), "full": full.tolist()},
    }


@pytest.fixture
def runs() -> list[dict[str, Any]]:
    """400 users. mostpop: hits 30 % sampled / 10 % full; recent: 20 % sampled / 25 % full (so the
    best baseline differs by metric); casm (2 seeds) hits what recent hits and 30 % more sampled
    users; sasrec equals casm seed 0 in both seeds."""
    rng = np.random.default_rng(0)
    users = np.arange(400)
    hits = lambda share: np.where(users < share * 400, 0, MISS)  # noqa: E731
    mostpop = run_of("mostpop", "mostpop", 0, rng.permutation(hits(0.3)), rng.permutation(hits(0.1)))
    recent_sampled, recent_full = hits(0.2), hits(0.25)
    recent = run_of("recent", "recent", 0, recent_sampled, recent_full)
    casm = [
        run_of("casm", "casm", 0, hits(0.5), recent_full),
        run_of("casm", "casm", 1, hits(0.5), np.where(users < 100, 1, MISS)),
    ]
    sasrec = [run_of("sasrec", "casm", s, hits(0.5), recent_full) for s in (0, 1)]
    return [mostpop, recent, *casm, *sasrec]


def test_aggregate_gives_mean_std_and_a_bootstrap_interval(runs: list[dict[str, Any]]) -> None:
    cfg = EvalConfig(ks=[10], bootstrap_replicates=300)
    summary = aggregate(runs, cfg)
    assert summary["casm"]["users"] == {"mean": 400.0, "std": 0.0}
    hr = summary["mostpop"]["sampled.hr@10"]
    assert hr["mean"] == pytest.approx(0.3) and hr["low"] < 0.3 < hr["high"]
    ndcg = summary["casm"]["full.ndcg@10"]  # seed 0: rank 0 (gain 1), seed 1: rank 1 (gain 1/log2 3)
    assert ndcg["mean"] == pytest.approx(0.25 * (1 + 1 / np.log2(3)) / 2)
    assert ndcg["std"] > 0 and ndcg["low"] < ndcg["mean"] < ndcg["high"]


def test_compare_uses_the_best_baseline_of_each_metric_and_the_reference(runs: list[dict[str, Any]]) -> None:
    cfg = EvalConfig(ks=[10], bootstrap_replicates=300)
    summary = aggregate(runs, cfg)
    differences = compare(runs, summary, cfg, reference="sasrec")
    against_best = differences["baseline"]
    assert set(against_best) == {"casm", "sasrec"}
    assert against_best["casm"]["sampled.hr@10"]["against"] == "mostpop"
    assert against_best["casm"]["full.hr@10"]["against"] == "recent"
    sampled = against_best["casm"]["sampled.hr@10"]
    assert sampled["mean"] == pytest.approx(0.2) and sampled["excludes_zero"]
    full = against_best["sasrec"]["full.hr@10"]  # identical ranks to recent
    assert (full["mean"], full["low"], full["high"], full["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    reference = differences["reference"]
    assert set(reference) == {"casm"} and reference["casm"]["full.ndcg@10"]["mean"] < 0
    assert compare(runs, summary, cfg, reference="absent")["reference"] == {}


def test_tables_name_the_protocol_and_the_baselines(runs: list[dict[str, Any]]) -> None:
    cfg = EvalConfig(ks=[10], bootstrap_replicates=100, full_exclude_history=True)
    summary = aggregate(runs, cfg)
    protocol = describe_protocol(cfg, heldout=False, case_users=np.arange(400))
    table = format_table(summary, cfg, protocol)
    assert "leave-one-out" in table and "except those of the user's events before the case" in table
    assert "over the 400 test users (400 cases" in table
    assert "| casm | 400 | 0.5000 [" in table
    differences = format_differences(compare(runs, summary, cfg)["baseline"], cfg, "Against the best baseline")
    assert "sampled.hr@10: mostpop" in differences and "full.hr@10: recent" in differences
    assert "| casm | +0.2000 [" in differences and " *" in differences
    assert format_differences({}, cfg, "none") == ""
    time_cut = describe_protocol(EvalConfig(split="time_cut"), heldout=False, case_users=np.array([3, 3, 5]))
    assert "time cut" in time_cut["split"] and "2 test users (3 cases" in time_cut["interval"]
    assert "every known item" in describe_protocol(EvalConfig(), True, np.arange(2))["full_ranking"]


def test_several_cases_of_a_user_are_resampled_together(runs: list[dict[str, Any]]) -> None:
    # All 400 cases one user's: every replicate draws that user, so the interval is the mean itself.
    cfg = EvalConfig(ks=[10], bootstrap_replicates=50)
    one_user = np.zeros(400, np.int64)
    summary = aggregate(runs, cfg, groups=one_user)
    hr = summary["mostpop"]["sampled.hr@10"]
    assert hr["low"] == pytest.approx(0.3) and hr["high"] == pytest.approx(0.3)
    diff = compare(runs, summary, cfg, groups=one_user)["baseline"]["casm"]["sampled.hr@10"]
    assert diff["low"] == pytest.approx(0.2) and diff["high"] == pytest.approx(0.2)


def test_eval_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="below"):
        EvalConfig(time_cut_validation_quantile=0.8, time_cut_test_quantile=0.7)
    with pytest.raises(ValueError, match="table_k"):
        EvalConfig(ks=[5, 20])


def test_result_json_keeps_lists_of_scalars_on_one_line() -> None:
    result = {"ranks": {"sampled": [3, 0, 12]}, "ids": ["a,b", "c"], "runs": [{"x": 1.5}], "nan": [float("nan")]}
    text = dumps_result(result)
    assert '"sampled": [3,0,12]' in text and '"ids": ["a,b","c"]' in text
    assert json.loads(text.replace("NaN", "null"))["runs"] == [{"x": 1.5}]
