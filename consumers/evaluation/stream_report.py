"""The report of a stream evaluation: metrics.json, report.md and PNG plots (matplotlib)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from casm_core.metrics import metrics_of_lists  # noqa: E402


def test_then_train_metrics(scores: list[dict[str, Any]], target: str, k: int, window_events: int,
                            positions: dict[tuple[int, int], int]) -> dict[str, Any]:
    """Metrics of the ranks the service computed before learning each event: sampled (positive
    among the sampled negatives, the paper's protocol) and full, for the target and per behaviour,
    per window of stream positions. Cold events and items unknown to the model count as misses
    in `*_all` and are left out of the plain numbers."""

    def ranks(rows: list[dict[str, Any]], key: str) -> list[int | None]:
        return [r[key] if r[key] >= 0 else None for r in rows]

    by_behaviour: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in scores:
        by_behaviour[row["behavior"]].append(row)
    target_rows = [r for r in by_behaviour.get(target, []) if not r["cold"]]
    known = [r for r in target_rows if r["rank_full"] >= 0]
    result: dict[str, Any] = {
        "scored_events": len(scores),
        "target_events": len(target_rows),
        "target_unknown_item": len(target_rows) - len(known),
        "sampled": metrics_of_lists(ranks(known, "rank_sampled"), k),
        "full": metrics_of_lists(ranks(known, "rank_full"), k),
        "full_all": metrics_of_lists(ranks(target_rows, "rank_full"), k),
        "num_sampled": scores[0]["num_sampled"] if scores else None,
        "by_behaviour": {
            b: {"sampled": metrics_of_lists(ranks([r for r in rows if not r["cold"] and r["rank_full"] >= 0], "rank_sampled"), k),
                "full": metrics_of_lists(ranks([r for r in rows if not r["cold"] and r["rank_full"] >= 0], "rank_full"), k)}
            for b, rows in sorted(by_behaviour.items())
        },
    }
    windows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in known:
        position = positions.get((r["partition"], r["offset"]))
        if position is not None:
            windows[position // window_events].append(r)
    result["by_window"] = [
        {"start": w * window_events, "end": (w + 1) * window_events,
         **{f"sampled_{m}": v for m, v in metrics_of_lists(ranks(rows, "rank_sampled"), k).items()},
         **{f"full_{m}": v for m, v in metrics_of_lists(ranks(rows, "rank_full"), k).items()}}
        for w, rows in sorted(windows.items())
    ]
    return result


def training_by_window(training: list[dict[str, Any]], window_events: int) -> dict[int, dict[str, float]]:
    """The trainer's work per window of stream positions, from the service's per-version rows
    (steps and wall seconds behind each version, at the applied-event count of its newest
    feed): steps per 1,000 events and steps per second of training wall time."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in training:
        window = int(row["events_applied"]) // window_events
        sums[window][0] += row["steps"]
        sums[window][1] += row["seconds"]
    return {
        w * window_events: {"steps": steps, "steps_per_1000_events": 1000 * steps / window_events,
                            "steps_per_s": steps / seconds if seconds > 0 else float("nan")}
        for w, (steps, seconds) in sums.items()
    }


def two_losses(prequential: dict[str, Any], test_then_train: dict[str, Any], k: int) -> dict[str, float]:
    """Published HR@k against the model's own test-then-train full-ranking HR@k (same exclusions):
    staleness = published - test-then-train (negative: the lists users got are worse than what
    the model of that moment would have sent)."""
    published = prequential.get(f"hr@{k}", float("nan"))
    model = test_then_train.get("full", {}).get(f"hr@{k}", float("nan"))
    return {"published": published, "model": model, "staleness": published - model}


def plot_hit_rate(path: Path, prequential: dict, test_then_train: dict, k: int, drift_at: list[int]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, windows, key in (
        (f"published top-{k} (prequential HR@{k})", prequential.get("by_window", []), f"hr@{k}"),
        (f"test-then-train sampled HR@{k}", test_then_train.get("by_window", []), f"sampled_hr@{k}"),
        (f"test-then-train full HR@{k} (the model of each moment)", test_then_train.get("by_window", []), f"full_hr@{k}"),
    ):
        if windows:
            ax.plot([(w["start"] + w["end"]) / 2 for w in windows], [w[key] for w in windows], marker=".", label=label)
    for i, at in enumerate(drift_at):
        ax.axvline(at, color="grey", linestyle="--", linewidth=1, label="scheduled drift" if i == 0 else None)
    ax.set_xlabel("stream position (events)")
    ax.set_ylabel(f"HR@{k} of target events")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_freshness(path: Path, values_ms: list[float]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    if values_ms:
        values = np.maximum(np.asarray(values_ms, dtype=float), 1.0)
        bins = np.logspace(0, math.log10(max(values.max(), 10.0)) + 0.1, 40)
        ax.hist(values, bins=bins)
        ax.set_xscale("log")
        for q, style in ((50, "-"), (99, "--")):
            ax.axvline(np.percentile(values, q), color="black", linestyle=style, linewidth=1,
                       label=f"p{q} {np.percentile(values, q):.0f} ms")
        ax.legend(fontsize=8)
    ax.set_xlabel("freshness: event produced -> recommendation published (ms)")
    ax.set_ylabel("recommendations")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alpha(path: Path, initial_alpha: dict[str, float], drift: list[dict[str, Any]], total_events: int) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    for behaviour, start in sorted(initial_alpha.items()):
        xs, ys = [0], [start]
        for entry in drift:
            if entry["kind"] == "alpha" and entry["behaviour"] == behaviour:
                xs += [entry["events_applied"], entry["events_applied"]]
                ys += [ys[-1], entry["new"]]
        xs.append(total_events)
        ys.append(ys[-1])
        ax.plot(xs, ys, label=f"alpha[{behaviour}]")
    for i, entry in enumerate(e for e in drift if e["kind"] == "detection"):
        ax.axvline(entry["events_applied"], color="red", alpha=0.3, linewidth=1,
                   label="drift detected" if i == 0 else None)
    ax.set_xlabel("events applied")
    ax.set_ylabel("alpha_b")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(path: Path, timeline: list[dict[str, float]]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    if timeline:
        t = [p["t"] for p in timeline]
        ax.plot(t, [p["events_per_s"] for p in timeline], label="events/s produced (replay)")
        applied = [p.get("applied", float("nan")) for p in timeline]
        rate = [float("nan")] + [(applied[i] - applied[i - 1]) / max(t[i] - t[i - 1], 1e-9) for i in range(1, len(t))]
        ax.plot(t, rate, label="events/s applied (service)")
        ax2 = ax.twinx()
        ax2.plot(t, [p.get("lag", float("nan")) for p in timeline], color="tab:red", alpha=0.6, label="consumer lag")
        ax2.set_ylabel("lag (events)")
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("events/s")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOT_FILES = {
    "hit_rate": "hr_over_time.png",
    "freshness": "freshness.png",
    "alpha": "alpha.png",
    "throughput": "throughput.png",
}
"""File name of each plot of a live run, inside its run folder."""


def write_plots(folder: Path, metrics: dict[str, Any], freshness_ms: list[float]) -> dict[str, Path]:
    """Write the four plots of a live run into `folder` and return their paths by `PLOT_FILES` key.

    `metrics` holds `k`, `prequential` (its `by_window`), `test_then_train` (its `by_window`; may be
    empty), `scheduled_drifts` (stream positions, events), `initial_alpha` (behaviour -> alpha),
    `serve` (its `drift` rows and `events_applied`) and `timeline` (samples, seconds since start);
    `freshness_ms` is each published recommendation's freshness in milliseconds."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {key: folder / name for key, name in PLOT_FILES.items()}
    k = metrics["k"]
    plot_hit_rate(paths["hit_rate"], metrics["prequential"], metrics["test_then_train"], k,
                  metrics.get("scheduled_drifts", []))
    plot_freshness(paths["freshness"], freshness_ms)
    plot_alpha(paths["alpha"], metrics["initial_alpha"], metrics["serve"].get("drift", []),
               metrics["serve"].get("events_applied", 0))
    plot_throughput(paths["throughput"], metrics["timeline"])
    return paths


def write_report(folder: Path, metrics: dict[str, Any], freshness_ms: list[float]) -> Path:
    """Write metrics.json, the plots and report.md into `folder`; returns report.md."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_plots(folder, metrics, freshness_ms)
    path = folder / "report.md"
    path.write_text(format_stream_report(metrics))
    return path


def _f(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_stream_report(m: dict[str, Any]) -> str:
    """report.md of a stream evaluation (`casm evaluate-stream`) from its metrics.json dict `m`:
    the published lists' prequential metrics, test-then-train ranks, freshness, per-window
    figures. Not the demo's short summary (`consumers.cli.commands.demo.format_demo_report`)."""
    k, pq, tt, serve = m["k"], m["prequential"], m["test_then_train"], m["serve"]
    lines = [
        f"# Stream evaluation: {m['data']}",
        "",
        f"- command: `{m['command']}`",
        f"- {m['events']:,} events replayed at {m['pace']}, policy `{m['policy']}`, recommender `{m['recommender']}`, "
        f"clock `{pq['clock']}`; run took {m['seconds']:.0f} s; all users' newest events reflected: "
        f"{'yes' if m['drained'] else 'NO'}",
        f"- service: {serve.get('events_applied', 0):,} applied, {serve.get('duplicates', 0)} duplicates, "
        f"{serve.get('dead_letters', 0)} dead letters, {serve.get('recommendations', 0):,} recommendations, "
        f"{serve.get('fine_tunes', 0)} fine-tunes (final model version {serve.get('model_version', 0)})",
        "",
        f"## What users were sent: published top-{k} before each event",
        "",
        f"| events | scored (warm) | cold (no list yet) | HR@{k} | NDCG@{k} | MRR |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| target `{m['target']}` | {pq['scored']:,} | {pq['cold']:,} | {_f(pq[f'hr@{k}'])} | {_f(pq[f'ndcg@{k}'])} | {_f(pq['mrr'])} |",
    ]
    for behaviour, row in pq.get("by_behaviour", {}).items():
        lines.append(f"| `{behaviour}` | {row['n']:,} | | {_f(row[f'hr@{k}'])} | {_f(row[f'ndcg@{k}'])} | {_f(row['mrr'])} |")
    cold = m.get("cold_users", {})
    if cold:
        lines += [
            "",
            f"New users (fewer than {cold['threshold']} earlier events) vs the rest, target events: "
            f"HR@{k} {_f(cold['new'][f'hr@{k}'])} over {cold['new']['n']:,} vs {_f(cold['established'][f'hr@{k}'])} "
            f"over {cold['established']['n']:,}.",
        ]
    lines += ["", "## The model of each moment: test-then-train ranks", ""]
    if not m.get("has_model", True):
        lines.append(f"Not measured: recommender `{m['recommender']}` has no model to rank with.")
    elif not tt["sampled"]["n"]:
        lines.append("Not measured: no model version was there to rank a target event before it was learned.")
    else:
        lines += [
            f"Each target event ranked by the model of that moment before it trains on it, against "
            f"{tt.get('num_sampled')} sampled items the user never touched (as the paper) and against every item.",
            "",
            f"| protocol | events | HR@{k} | NDCG@{k} | MRR |",
            "| --- | --- | --- | --- | --- |",
            f"| sampled | {tt['sampled']['n']:,} | {_f(tt['sampled'][f'hr@{k}'])} | {_f(tt['sampled'][f'ndcg@{k}'])} | {_f(tt['sampled']['mrr'])} |",
            f"| full ranking | {tt['full']['n']:,} | {_f(tt['full'][f'hr@{k}'])} | {_f(tt['full'][f'ndcg@{k}'])} | {_f(tt['full']['mrr'])} |",
            f"| full, unknown items as misses | {tt['full_all']['n']:,} | {_f(tt['full_all'][f'hr@{k}'])} | {_f(tt['full_all'][f'ndcg@{k}'])} | {_f(tt['full_all']['mrr'])} |",
        ]
    lines += [
        "",
        "## Freshness (event produced -> recommendation published)",
        "",
        f"p50 {_f(pq.get('freshness_p50_ms'), 0)} ms, p90 {_f(pq.get('freshness_p90_ms'), 0)} ms, "
        f"p99 {_f(pq.get('freshness_p99_ms'), 0)} ms, max {_f(pq.get('freshness_max_ms'), 0)} ms over "
        f"{pq.get('freshness_count', 0):,} recommendations. Histogram (ms): "
        + ", ".join(f"{label}: {n:,}" for label, n in pq.get("freshness_histogram", []))
        + (" (the whole log was produced before the service started consuming, so these times are "
           "the backlog's age, not the service's freshness: pace the replay with --rate or --speed "
           "to measure freshness)" if m.get("produced_first") else ""),
        "",
        "## Per window of the stream (target events): the model against the pipeline",
        "",
        f"The model's own quality is its test-then-train full-ranking HR@{k} (the model of that moment, "
        "with the lists' exclusions); staleness is published minus that: what the lists lost by being "
        "made by an older model, or before the newest events were applied. The trainer columns say "
        "whether it kept up (steps per 1,000 events of the window, steps per second of training).",
        "",
    ]
    losses = two_losses(pq, tt, k)
    if m.get("has_model", True) and tt["full"]["n"]:
        lines += [f"Whole run: published HR@{k} {_f(losses['published'])}, model {_f(losses['model'])}, "
                  f"staleness {_f(losses['staleness'])}.", ""]
    lines += [
        f"| positions | published HR@{k} | n | model (test-then-train full) HR@{k} | staleness | "
        f"test-then-train sampled HR@{k} | trainer steps / 1k events | trainer steps/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    tt_by = {w["start"]: w for w in tt.get("by_window", [])}
    trained = training_by_window(serve.get("training", []), m.get("window_events") or 1)
    for w in pq.get("by_window", []):
        t = tt_by.get(w["start"], {})
        model_hr = t.get(f"full_hr@{k}")
        stale = None if model_hr is None else w[f"hr@{k}"] - model_hr
        work = trained.get(w["start"], {})
        lines.append(
            f"| {w['start']:,}-{w['end']:,} | {_f(w[f'hr@{k}'])} | {w['n']:,} | {_f(model_hr)} | {_f(stale)} | "
            f"{_f(t.get(f'sampled_hr@{k}'))} | {_f(work.get('steps_per_1000_events'), 1)} | {_f(work.get('steps_per_s'), 1)} |"
        )
    drift = serve.get("drift", [])
    lines += [
        "",
        "## Drift and alpha",
        "",
        f"Initial alpha {m['initial_alpha']}; final {serve.get('alpha', {})}. "
        f"{sum(1 for d in drift if d['kind'] == 'detection')} detections, "
        f"{sum(1 for d in drift if d['kind'] == 'alpha')} alpha changes:",
        "",
    ]
    lines += [
        f"- at {d['events_applied']:,} events: " + (
            f"drift on `{d['signal']}` of `{d['behaviour']}` ({d['detector']})" if d["kind"] == "detection"
            else f"alpha[{d['behaviour']}] {d['old']:.3f} -> {d['new']:.3f} ("
            f"{'gradient cosine' if d.get('basis') == 'gradient' else 'post-detection conversion'} {d['estimate']:.3f})"
        )
        for d in drift
    ] or ["- none"]
    lines += [
        "",
        "Plots: `hr_over_time.png`, `freshness.png`, `alpha.png`, `throughput.png`.",
        "",
    ]
    return "\n".join(lines)
