"""Drift detection and alpha re-weighting, measured.

    .venv/bin/python bench/bench_drift.py detectors          # false alarms and delays, many seeds
    .venv/bin/python bench/bench_drift.py simulate --out results/drift
    .venv/bin/python bench/bench_drift.py tables results/drift/*/simulate.json   # Markdown

- detectors: each River detector (ADWIN, PageHinkley, KSWIN as configured in `drift`) on
  hand-made Bernoulli signals: the share of stationary streams with any alarm, and the delay after a
  step change (median over seeds, and the share of changes missed).
- simulate: the synthetic stream with the realistic funnel (preset `funnel`: buys about 2 % of
  events, views about 90 %), warmed up before a drift, for each drift kind x alpha policy x seed,
  through the service's learning loop in process (`simulate`: the live test-then-train ranking,
  drift monitor, policies, replay buffer and trainer; no broker, store or publisher, so 27 runs
  fit in an hour on two cores). Reports HR@10 of buys by the model of each moment before and
  after the drift, the events to recover to 90 % of the pre-drift level, overall HR@10, with
  95 % intervals over seeds; writes simulate.json, curves.json and drift_simulation.png.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from casm_core.replay_buffer import ReplayBuffer  # noqa: E402
from casm_core.scoring import Scorer  # noqa: E402
from casm_core.trainer import Trainer  # noqa: E402
from consumers.adapt.drift import DetectorBank, DriftMonitor  # noqa: E402
from consumers.adapt.event_scoring import score_events  # noqa: E402
from consumers.presets import load_settings  # noqa: E402
from consumers.settings import CasmSettings, DriftConfig  # noqa: E402
from consumers.training.worker import deterministic_steps  # noqa: E402
from stream.config import SyntheticConfig  # noqa: E402
from stream.synthetic import generate  # noqa: E402

# The live defaults on the funnel preset, except a smaller model without dropout (27 runs must fit
# in about an hour on two cores; stated beside the results) and a similarity every 100 steps.
BASE: CasmSettings = load_settings("funnel", progress=False,
                                   model={"hidden_dim": 32, "context_dim": 16, "ffn_dim": 32, "max_len": 30,
                                          "dropout": 0.0},
                                   drift={"gradient_every_steps": 100})


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


# ----------------------------------------------------------------------------- simulate
DRIFTS: dict[str, list[dict]] = {
    # (a) carts stop converting, favourites start (conversions of carts / favs written from then on).
    "conversion": [{"behaviour": "cart", "conversion": 0.0}, {"behaviour": "fav", "conversion": 0.6}],
    # (b) a new cluster of 300 fresh items takes 70 % of every user's taste.
    "new_cluster": [{"new_cluster_items": 300, "new_cluster_share": 0.7}],
    "stationary": [],
}
POLICIES = ("fixed", "conversion", "gradient")


@dataclass
class SimulationResult:
    """Per target event (in stream order): its stream position and whether the model of that
    moment had it in its full top-K (cold users left out); the alpha log and trainer steps."""

    positions: np.ndarray
    hits: np.ndarray
    in_window: np.ndarray  # the bought item was in the user's window before the buy
    alpha_log: list[dict]
    detections: list[dict]
    steps: int
    seconds: float
    similarity_seconds: float
    similarities: int


def simulate(settings: CasmSettings, events, *, round_events: int, steps_per_1000: float,
             batch_events: int, progress: bool = False) -> SimulationResult:
    """The service's learning loop at --max in deterministic mode, in process and without Kafka or
    DuckDB: per batch of `batch_events` events, rank the batch's target events (and a share of the
    others) test-then-train with `score_events` (the live code), feed hits and events to the
    `DriftMonitor` and its policy (the live code), apply the events to the users' windows; every
    `round_events` events feed the touched windows to a `ReplayBuffer` and take the round's steps
    with the `Trainer` (the live trainer's code), measuring gradient similarities when the
    `gradient` policy asks. What is left out: publishing (lists are the model's own ranking, no
    staleness) and the store."""
    model_cfg, cfg, serve = settings.model, settings.drift, settings.serve
    names = list(settings.behaviours.names)
    target, k, width = settings.behaviours.target, cfg.hit_k, model_cfg.max_len + 1
    target_index = names.index(target) + 1
    trainer = Trainer(model_cfg, settings.train, settings.behaviours)
    buffer = ReplayBuffer(width, serve.replay_recent_users, serve.replay_reservoir_users, seed=settings.train.seed)
    monitor = DriftMonitor(cfg, target)
    alpha = dict(trainer.alpha)
    rng = np.random.default_rng(cfg.seed)
    user_ids = events.column("user_id").to_pylist()
    item_ids = events.column("item_id").to_pylist()
    behaviour_names = events.column("behavior").to_pylist()
    timestamps = events.column("timestamp").to_pylist()
    users = {u: i for i, u in enumerate(dict.fromkeys(user_ids))}
    items: dict[str, int] = {}
    item_codes = np.array([items.setdefault(i, len(items) + 1) for i in item_ids], dtype=np.int64)
    user_codes = np.array([users[u] for u in user_ids], dtype=np.int64)
    behaviour_codes = np.array([names.index(b) + 1 for b in behaviour_names], dtype=np.int64)
    item_list = list(items)
    window_items = np.zeros((len(users), width), dtype=np.int64)
    window_behaviours = np.zeros((len(users), width), dtype=np.int64)
    positions, hits, seen, alpha_log, detections = [], [], [], [], []
    touched: dict[int, None] = {}
    since_round, carried, steps, steps_at_similarity, want_similarity = 0, 0.0, 0, 0, False
    similarity_seconds, measurements = 0.0, 0
    scorer = None
    started = time.perf_counter()

    def change_alpha(changes, at: int) -> None:
        for change in changes:
            alpha[change.behaviour] = change.new
            alpha_log.append({"events_applied": at, "behaviour": change.behaviour, "old": change.old,
                              "new": change.new, "estimate": change.estimate, "basis": change.basis})

    for start in tqdm(range(0, len(user_ids), batch_events), disable=not progress, unit="batch"):
        rows = np.arange(start, min(start + batch_events, len(user_ids)))
        batch_users, codes = np.unique(user_codes[rows], return_inverse=True)
        is_target = behaviour_codes[rows] == target_index
        scored = np.flatnonzero(is_target | (rng.random(rows.size) < cfg.score_other_fraction))
        batch_hits = []
        if scorer is not None and scored.size:
            result = score_events(
                scorer, scored, window_items[batch_users, 1:], window_behaviours[batch_users, 1:], codes,
                item_codes[rows], behaviour_codes[rows], cfg.sampled_negatives, rng, cfg.score_chunk_events)
            for row, rank, cold in zip(result.rows.tolist(), result.rank_full.tolist(), result.cold.tolist(), strict=True):
                if cold:
                    continue
                hit = int(0 <= rank < k)  # an item the model does not know yet is a miss
                batch_hits.append((behaviour_names[rows[row]], hit))
                if is_target[row]:
                    positions.append(int(rows[row]))
                    hits.append(hit)
                    seen.append(bool((window_items[user_codes[rows[row]]] == item_codes[rows[row]]).any()))
        observed = [(user_ids[r], item_ids[r], behaviour_names[r], timestamps[r], 0) for r in rows.tolist()]
        found, changes = monitor.observe(batch_hits, observed, alpha)
        detections += [{"events_applied": int(rows[-1]), "behaviour": d.behaviour, "signal": d.signal} for d in found]
        change_alpha(changes, int(rows[-1]))
        want_similarity |= bool(found) and monitor.policy.measures_gradients
        for r in rows.tolist():  # the users' rolling windows, newest event last
            u = user_codes[r]
            window_items[u, :-1] = window_items[u, 1:]
            window_behaviours[u, :-1] = window_behaviours[u, 1:]
            window_items[u, -1], window_behaviours[u, -1] = item_codes[r], behaviour_codes[r]
            touched[u] = None
        since_round += rows.size
        if since_round < round_events:
            continue
        chosen = np.fromiter(touched, dtype=np.int64)
        buffer.add(chosen.tolist(), window_items[chosen], window_behaviours[chosen])
        touched.clear()
        trainer.add_items(item_list[len(trainer.items) : int(item_codes[: rows[-1] + 1].max())])
        trainer.set_alpha(alpha)
        count, carried = deterministic_steps(since_round, steps_per_1000, carried)
        since_round = 0
        for _ in range(count):
            batch_items, batch_behaviours = buffer.sample(settings.train.batch_size, serve.replay_recent_share)
            trainer.fine_tune(batch_items, batch_behaviours, steps=1)
            steps += 1
            due = monitor.policy.measures_gradients and steps - steps_at_similarity >= cfg.gradient_every_steps
            if want_similarity or due:
                measured = time.perf_counter()
                similarity = trainer.gradient_similarity(*buffer.sample(cfg.gradient_rows, serve.replay_recent_share),
                                                         rows=cfg.gradient_rows)
                similarity_seconds += time.perf_counter() - measured
                measurements += 1
                change_alpha(monitor.policy.on_similarity(similarity, alpha), int(rows[-1]))
                trainer.set_alpha(alpha)
                want_similarity, steps_at_similarity = False, steps
        if count:
            scorer = Scorer(trainer.model, target_index).with_catalogue(len(items))
    return SimulationResult(np.asarray(positions), np.asarray(hits), np.asarray(seen, dtype=bool), alpha_log, detections, steps,
                            time.perf_counter() - started, similarity_seconds, measurements)


def windowed(result: SimulationResult, window: int, total: int) -> tuple[np.ndarray, np.ndarray]:
    """HR@K per window of `window` stream positions: (window starts, hit rate; NaN when empty)."""
    starts = np.arange(0, total, window)
    index = result.positions // window
    sums = np.bincount(index, weights=result.hits, minlength=starts.size)[: starts.size]
    counts = np.bincount(index, minlength=starts.size)[: starts.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return starts, np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def recovery(starts: np.ndarray, hr: np.ndarray, drift_at: int, pre_span: int, window: int) -> dict:
    """Pre-drift level (windows of the `pre_span` events before the drift), post-drift mean, the
    lowest window after it, and events from the drift to the end of the first window back at
    90 % of the level, after the first window below it (0: never below; None: never back)."""
    before = hr[(starts >= drift_at - pre_span) & (starts + window <= drift_at)]
    after = starts >= drift_at
    level = float(np.nanmean(before))
    post = hr[after]
    below = np.flatnonzero(post < 0.9 * level)
    if below.size == 0:
        events = 0
    else:
        back = [i for i in range(below[0], post.size) if post[i] >= 0.9 * level]
        events = int(starts[after][back[0]] + window - drift_at) if back else None
    return {"before": level, "after": float(np.nanmean(post)), "lowest_after": float(np.nanmin(post)),
            "events_to_recover_90pct": events}


def bench_simulate(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for drift in args.drifts:
        for seed in range(args.seeds):
            specs = [{"at_event": args.drift_at, **spec} for spec in DRIFTS[drift]]
            config = SyntheticConfig(**{**BASE.synthetic.model_dump(), "n_events": args.events, "seed": seed,
                                        "drifts": specs})
            stream = generate(config)
            for policy in args.policies:
                settings = BASE.model_copy(deep=True)
                settings.drift.policy = policy
                if args.alpha:
                    settings.behaviours.alpha = {**settings.behaviours.alpha, **json.loads(args.alpha)}
                settings.train.seed = seed
                settings.drift.seed = seed
                result = simulate(settings, stream.events, round_events=args.round_events,
                                  steps_per_1000=args.steps_per_1000, batch_events=args.batch_events)
                starts, hr = windowed(result, args.window, args.events)
                key = f"{drift}/{policy}/seed{seed}"
                unseen = ~result.in_window
                runs[key] = {
                    "overall": float(result.hits.mean()), "target_events": int(result.hits.size),
                    "overall_not_in_window": float(result.hits[unseen].mean()) if unseen.any() else float("nan"),
                    "share_in_window": float(result.in_window.mean()),
                    "steps": result.steps, "seconds": round(result.seconds, 1),
                    "similarity_seconds": round(result.similarity_seconds, 2), "similarities": result.similarities,
                    "alpha_changes": len(result.alpha_log), "detections": len(result.detections),
                    "final_alpha": {b: round(v, 4) for b, v in (result.alpha_log and _final_alpha(settings, result) or {}).items()},
                    **({} if drift == "stationary" else recovery(starts, hr, args.drift_at, args.pre_span, args.window)),
                }
                curves[key] = {"starts": starts.tolist(), "hr": hr.tolist(), "alpha_log": result.alpha_log,
                               "detections": result.detections}
                print(key, json.dumps(runs[key]), flush=True)
                (out / "simulate.json").write_text(json.dumps({"args": _args(args), "runs": runs}, indent=2))
                (out / "curves.json").write_text(json.dumps(curves))
    summary = summarise_simulation(runs, args)
    (out / "simulate.json").write_text(json.dumps({"args": _args(args), "runs": runs, "summary": summary}, indent=2))
    plot_simulation(out, curves, args)
    return summary


def _final_alpha(settings: CasmSettings, result: SimulationResult) -> dict[str, float]:
    alpha = {b: settings.behaviours.alpha_of(b) for b in settings.behaviours.names}
    for entry in result.alpha_log:
        alpha[entry["behaviour"]] = entry["new"]
    return alpha


def _args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _interval(values: list[float]) -> list[float]:
    """Mean and a 95 % t interval over seeds."""
    from scipy import stats

    array = np.asarray([v for v in values if v is not None], dtype=float)
    if array.size < 2:
        return [float(array.mean()) if array.size else float("nan"), float("nan"), float("nan")]
    half = stats.t.ppf(0.975, array.size - 1) * array.std(ddof=1) / np.sqrt(array.size)
    return [float(array.mean()), float(array.mean() - half), float(array.mean() + half)]


def summarise_simulation(runs: dict[str, dict], args: argparse.Namespace) -> dict:
    summary: dict[str, dict] = {}
    for drift in args.drifts:
        for policy in args.policies:
            rows = [runs[f"{drift}/{policy}/seed{s}"] for s in range(args.seeds)]
            entry = {"overall": _interval([r["overall"] for r in rows])}
            if drift != "stationary":
                for key in ("before", "after", "lowest_after"):
                    entry[key] = _interval([r[key] for r in rows])
                entry["events_to_recover_90pct"] = [r["events_to_recover_90pct"] for r in rows]
            if "fixed" in args.policies:
                fixed = [runs[f"{drift}/fixed/seed{s}"]["overall"] for s in range(args.seeds)]
                entry["overall_minus_fixed"] = _interval([r["overall"] - f for r, f in zip(rows, fixed, strict=True)])
            summary[f"{drift}/{policy}"] = entry
    return summary


def plot_simulation(out: Path, curves: dict[str, dict], args: argparse.Namespace) -> None:
    drifts = [d for d in args.drifts]
    fig, axes = plt.subplots(2, len(drifts), figsize=(5 * len(drifts), 7), squeeze=False, sharex=True)
    colours = {"fixed": "tab:grey", "conversion": "tab:blue", "gradient": "tab:red"}
    for column, drift in enumerate(drifts):
        top, bottom = axes[0][column], axes[1][column]
        for policy in args.policies:
            keys = [f"{drift}/{policy}/seed{s}" for s in range(args.seeds)]
            hr = np.nanmean([curves[k]["hr"] for k in keys], axis=0)
            starts = np.asarray(curves[keys[0]]["starts"])
            top.plot(starts + args.window / 2, hr, label=policy, color=colours.get(policy))
            log0 = curves[keys[0]]["alpha_log"]
            for behaviour, style in (("pv", ":"), ("cart", "-"), ("fav", "--")):
                xs = [0] + [e["events_applied"] for e in log0 if e["behaviour"] == behaviour]
                ys = [BASE.behaviours.alpha_of(behaviour)] + [e["new"] for e in log0 if e["behaviour"] == behaviour]
                bottom.step(xs + [args.events], ys + [ys[-1]], where="post", color=colours.get(policy), linestyle=style,
                            label=f"{policy} alpha[{behaviour}]" if policy != "fixed" else None)
            for d in curves[keys[0]]["detections"]:
                bottom.axvline(d["events_applied"], color=colours.get(policy), alpha=0.15, linewidth=0.8)
        for ax in (top, bottom):
            if drift != "stationary":
                ax.axvline(args.drift_at, color="black", linestyle="--", linewidth=1)
            ax.grid(alpha=0.3)
        top.set_title(f"{drift}: HR@10 of buys, mean of {args.seeds} seeds")
        bottom.set_title("alpha_b (seed 0); faint lines: detections")
        bottom.set_xlabel("stream position (events)")
        top.legend(fontsize=8)
        bottom.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "drift_simulation.png", dpi=110)
    plt.close(fig)


def format_tables(paths: list[Path]) -> str:
    """Markdown tables (policy x seed, and means with 95 % intervals over seeds) of simulate.json files."""
    def f(value) -> str:
        return "n/a" if value is None or value != value else f"{value:.3f}"

    def ci(triple) -> str:
        return f"{f(triple[0])} [{f(triple[1])}, {f(triple[2])}]"

    lines = ["| run | seed | HR@10 before | after | lowest window after | events to 90 % | overall | not in window | alpha changes |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    summaries = []
    for path in paths:
        data = json.loads(path.read_text())
        for key, run in data["runs"].items():
            drift, policy, seed = key.split("/")
            recover = run.get("events_to_recover_90pct", "")
            lines.append(f"| {drift} / {policy} | {seed[4:]} | {f(run.get('before'))} | {f(run.get('after'))} | "
                         f"{f(run.get('lowest_after'))} | {'' if recover is None and drift == 'stationary' else recover} | "
                         f"{f(run['overall'])} | {f(run.get('overall_not_in_window'))} | {run['alpha_changes']} |")
        summaries.append(data.get("summary", {}))
    lines += ["", "| run | HR@10 before | after | overall | overall minus `fixed` (paired by seed) | events to 90 % by seed |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for summary in summaries:
        for key, entry in summary.items():
            lines.append(f"| {key.replace('/', ' / ')} | {ci(entry['before']) if 'before' in entry else ''} | "
                         f"{ci(entry['after']) if 'after' in entry else ''} | {ci(entry['overall'])} | "
                         f"{ci(entry['overall_minus_fixed']) if 'overall_minus_fixed' in entry else ''} | "
                         f"{entry.get('events_to_recover_90pct', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["detectors", "simulate", "tables"])
    parser.add_argument("files", nargs="*", type=Path, help="tables: simulate.json files")
    parser.add_argument("--seeds", type=int, default=None, help="detectors: streams per case (200); simulate: seeds (3)")
    parser.add_argument("--length", type=int, default=2_000, help="detectors: updates per stream")
    parser.add_argument("--events", type=int, default=150_000, help="simulate: synthetic events")
    parser.add_argument("--drift-at", type=int, default=90_000, help="simulate: event of the drift")
    parser.add_argument("--window", type=int, default=5_000, help="simulate: events per HR window")
    parser.add_argument("--pre-span", type=int, default=20_000, help="simulate: pre-drift events averaged")
    parser.add_argument("--round-events", type=int, default=1_000, help="simulate: events per training round")
    parser.add_argument("--steps-per-1000", type=float, default=16.0, help="simulate: steps per 1,000 events")
    parser.add_argument("--batch-events", type=int, default=100, help="simulate: events per batch (poll)")
    parser.add_argument("--drifts", nargs="+", default=list(DRIFTS), choices=list(DRIFTS), help="simulate: drift kinds")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES), help="simulate: policies")
    parser.add_argument("--alpha", default=None, help='simulate: starting alpha overrides (JSON, e.g. {"pv": 1.0})')
    parser.add_argument("--out", type=Path, default=Path("results/drift"), help="simulate: output folder")
    args = parser.parse_args()
    if args.what == "tables":
        print(format_tables(args.files))
        return
    if args.what == "detectors":
        result = bench_detectors(args.seeds or 200, args.length)
    else:
        args.seeds = args.seeds or 3
        result = bench_simulate(args)
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
