"""Drift detection and alpha re-weighting, measured.

    .venv/bin/python bench/bench_drift.py detectors            # false alarms and delays, many seeds
    .venv/bin/python bench/bench_drift.py live --out results/drift

- detectors: each River detector (ADWIN, PageHinkley, KSWIN as configured in `drift`) on
  hand-made Bernoulli signals: the share of stationary streams with any alarm, and the delay after a
  step change (median over seeds, and the share of changes missed).
- live: the synthetic stream with a scheduled drift (carts stop predicting buys, favourites start
  predicting them) and without, each through the production path (`casm evaluate-stream`: replay,
  `casm serve`, published lists scored on later buys) once with the `fixed` and once with the
  adaptive (`conversion`) policy. Reports prequential HR@10 before and after the drift, the events
  the policy needs to recover to 90% of the pre-drift level, when alpha_cart / alpha_fav moved,
  and HR@10 on the stationary stream; writes the summary (drift.json), a plot (drift_hr.png) and the
  raw metrics next to them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from consumers.drift import DetectorBank  # noqa: E402
from consumers.settings import DriftConfig  # noqa: E402


def bernoulli(rng: np.random.Generator, p: float, n: int) -> np.ndarray:
    return (rng.random(n) < p).astype(float)


def detections(cfg: DriftConfig, values: np.ndarray) -> list[int]:
    bank = DetectorBank(cfg)
    return [i for i, v in enumerate(values) if bank.update("conversion", "cart", float(v)) is not None]


def bench_detectors(seeds: int, length: int) -> dict:
    results = {}
    for detector in ("adwin", "page_hinkley", "kswin"):
        cfg = DriftConfig(detector=detector, cooldown_updates=0)
        for p in (0.05, 0.3, 0.5):
            alarms = sum(bool(detections(cfg, bernoulli(np.random.default_rng(10_000 + s), p, length)))
                         for s in range(seeds))
            results.setdefault(detector, {})[f"false_alarm_rate_p{p}"] = alarms / seeds
        delays, missed = [], 0
        for s in range(seeds):
            rng = np.random.default_rng(s)
            values = np.concatenate([bernoulli(rng, 0.5, length // 2), bernoulli(rng, 0.05, length // 2)])
            after = [i - length // 2 for i in detections(cfg, values) if i >= length // 2]
            if after:
                delays.append(after[0])
            else:
                missed += 1
        results[detector]["step_0.5_to_0.05_median_delay"] = float(np.median(delays)) if delays else None
        results[detector]["step_missed_rate"] = missed / seeds
    return {"seeds": seeds, "updates_per_stream": length, "detectors": results}


# The experiment starts from alpha calibrated to the world before the drift (alpha_b ~ b's
# conversion, the target 1), as an operator would have set it; the drift then makes it wrong.
CALIBRATED_ALPHA = {"pv": 0.07, "cart": 0.5, "fav": 0.05, "buy": 1.0}
# More training per event than the service's defaults, so the model is worth re-weighting
# within a stream of this length.
TRAINING = ["--serve.fine-tune-every-events", "2500", "--serve.fine-tune-steps", "48"]


def synthetic(events: int, drift_at: int | None, seed: int) -> dict:
    config: dict = {"n_events": events, "seed": seed, "fav_conversion": 0.05}
    if drift_at is not None:
        config["drifts"] = [
            {"at_event": drift_at, "behaviour": "cart", "conversion": 0.0},
            {"at_event": drift_at, "behaviour": "fav", "conversion": 0.6},
        ]
    return config


def evaluate(folder: Path, config: dict, policy: str, extra: list[str]) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "consumers.cli", "evaluate-stream", "--synthetic", "--policy", policy,
        "--report-dir", str(folder), "--progress", "false",
        "--synthetic.n-events", str(config["n_events"]), "--synthetic.seed", str(config["seed"]),
        "--synthetic.fav-conversion", str(config["fav_conversion"]),
        "--synthetic.drifts", json.dumps(config.get("drifts", [])),
        "--behaviours.alpha", json.dumps(CALIBRATED_ALPHA), *TRAINING, *extra,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["_command"] = " ".join(command[1:])
    return metrics


def windows(metrics: dict) -> tuple[np.ndarray, np.ndarray]:
    rows = metrics["prequential"].get("by_window", [])
    return np.array([w["start"] for w in rows]), np.array([w["hr@10"] for w in rows])


def summarise(metrics: dict, drift_at: int, baseline_span: int) -> dict:
    starts, hr = windows(metrics)
    before = hr[(starts >= drift_at - baseline_span) & (starts < drift_at)]
    after_mask = starts >= drift_at
    level = float(before.mean()) if before.size else float("nan")
    recovered = [int(s - drift_at) for s, h in zip(starts[after_mask], hr[after_mask], strict=True) if h >= 0.9 * level]
    alpha = {}
    for entry in metrics["serve"].get("drift", []):
        if entry["kind"] == "alpha" and entry["events_applied"] >= drift_at and entry["behaviour"] not in alpha:
            alpha[entry["behaviour"]] = {"events_after_drift": entry["events_applied"] - drift_at,
                                         "old": round(entry["old"], 3), "new": round(entry["new"], 3)}
    return {
        "hr@10_overall": metrics["prequential"]["hr@10"],
        "hr@10_before_drift": level,
        "hr@10_after_drift": float(hr[after_mask].mean()) if after_mask.any() else float("nan"),
        "events_to_recover_90pct": recovered[0] if recovered else None,
        "first_alpha_change_after_drift": alpha,
        "final_alpha": metrics["serve"].get("alpha", {}),
    }


def bench_live(args: argparse.Namespace) -> dict:
    out: Path = args.out
    extra = ["--live.window-events", str(args.window)]
    runs = {}
    for name, drift_at in (("drift", args.drift_at), ("stationary", None)):
        config = synthetic(args.events, drift_at, args.seed)
        for policy in ("fixed", "adaptive"):
            runs[f"{name}/{policy}"] = evaluate(out / f"{name}-{policy}", config, policy, extra)
    summary = {
        key: summarise(metrics, args.drift_at, args.baseline_span) if key.startswith("drift") else
        {"hr@10_overall": metrics["prequential"]["hr@10"], "final_alpha": metrics["serve"].get("alpha", {})}
        for key, metrics in runs.items()
    }
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, metrics in runs.items():
        starts, hr = windows(metrics)
        ax.plot(starts + args.window / 2, hr, label=key, linestyle="-" if key.startswith("drift") else ":")
    ax.axvline(args.drift_at, color="grey", linestyle="--", label="drift (drift runs)")
    ax.set_xlabel("stream position (events)")
    ax.set_ylabel("prequential HR@10 of buys")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "drift_hr.png", dpi=110)
    result = {"events": args.events, "drift_at": args.drift_at, "window": args.window, "summary": summary,
              "commands": {k: m["_command"] for k, m in runs.items()}}
    (out / "drift.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["detectors", "live"])
    parser.add_argument("--seeds", type=int, default=200, help="detectors: streams per case")
    parser.add_argument("--length", type=int, default=2_000, help="detectors: updates per stream")
    parser.add_argument("--events", type=int, default=80_000, help="live: synthetic events")
    parser.add_argument("--drift-at", type=int, default=30_000, help="live: event of the drift")
    parser.add_argument("--window", type=int, default=2_000, help="live: events per HR window")
    parser.add_argument("--baseline-span", type=int, default=10_000, help="live: pre-drift events averaged")
    parser.add_argument("--seed", type=int, default=0, help="live: synthetic seed")
    parser.add_argument("--out", type=Path, default=Path("results/drift"), help="live: output folder")
    args = parser.parse_args()
    result = bench_detectors(args.seeds, args.length) if args.what == "detectors" else bench_live(args)
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
