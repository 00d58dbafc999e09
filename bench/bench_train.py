"""Training and scoring speed of CASM on the CPU.

Measures, in one run on synthetic sequences of the stated shape:
- training throughput (sequences/s, seconds/epoch) of the offline trainer, batch building included;
- the share of that time spent building batches, and the vectorised batch builder against a
  per-sample Python loop doing the same work (the ratio is what to compare across machines);
- scoring latency: top-K over every item for a batch of users;
- the same training throughput and top-K latency for each model option (``--options``), so an
  option's cost is a ratio measured side by side in one run.

    .venv/bin/python bench/bench_train.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from casm_core.config import BehaviourConfig, ModelConfig, TrainConfig
from casm_core.sampling import SequenceCorpus
from casm_core.scoring import Scorer
from casm_core.trainer import Trainer

# name -> (ModelConfig overrides, TrainConfig overrides) of the options measured against "plain".
OPTIONS = {
    "plain": ({}, {}),
    "film": ({"target_conditioning": "film"}, {}),
    "repeat": ({"repeat_score": True}, {"window_negatives": 1}),
    "battn": ({"behaviour_attention": True}, {}),
    "nextb": ({}, {"next_behaviour_weight": 0.5}),
    "film+repeat": ({"target_conditioning": "film", "repeat_score": True}, {"window_negatives": 1}),
}


def synthetic_corpus(users: int, items: int, max_len: int, seed: int) -> SequenceCorpus:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_len // 2, 2 * max_len, users)
    owners = np.repeat(np.arange(users), lengths)
    return SequenceCorpus.from_events(
        owners, rng.integers(1, items + 1, owners.size), rng.integers(1, 5, owners.size), users
    )


def loop_batch(corpus: SequenceCorpus, users: np.ndarray, width: int, num_items: int, rng: np.random.Generator):
    """The per-sample Python loop the vectorised builder replaces (same outputs' shapes)."""
    items = np.zeros((len(users), width), np.int64)
    behaviours = np.zeros((len(users), width), np.int64)
    negatives = np.zeros((len(users), width - 1), np.int64)
    for row, user in enumerate(users):
        seq = corpus.items[corpus.offsets[user] : corpus.offsets[user + 1]]
        beh = corpus.behaviours[corpus.offsets[user] : corpus.offsets[user + 1]]
        end = int(rng.integers(2, len(seq) + 1))
        window, window_beh = seq[max(0, end - width) : end], beh[max(0, end - width) : end]
        items[row, width - len(window) :] = window
        behaviours[row, width - len(window) :] = window_beh
        touched = set(seq.tolist())
        for col in range(width - 1):
            negative = int(rng.integers(1, num_items + 1))
            while negative in touched:
                negative = int(rng.integers(1, num_items + 1))
            negatives[row, col] = negative
    return items, behaviours, negatives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--users", type=int, default=6000)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--score-users", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"options to measure, of {sorted(OPTIONS)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]

    corpus = synthetic_corpus(args.users, args.items, args.max_len, seed=0)
    steps = -(-args.users // args.batch_size)  # one pass over the users

    def measure(model_overrides: dict, train_overrides: dict) -> tuple[Trainer, float, float, list[float]]:
        model_cfg = ModelConfig(
            hidden_dim=args.hidden_dim, context_dim=args.hidden_dim, num_heads=args.heads,
            num_blocks=args.blocks, ffn_dim=args.hidden_dim, max_len=args.max_len, dropout=args.dropout,
            **model_overrides,
        )
        train_cfg = TrainConfig(batch_size=args.batch_size, max_steps=steps, seed=0, **train_overrides)
        trainer = Trainer(model_cfg, train_cfg, BehaviourConfig(), item_ids=[str(i) for i in range(args.items)])
        # Warm-up, then one timed pass through the public trainer.
        trainer.fine_tune(*corpus.windows(np.arange(64), np.full(64, args.max_len // 2), args.max_len + 1))
        report = trainer.fit(corpus, validate=None, progress=False)
        scorer = Scorer(trainer.model, 4)
        batch_users = np.arange(args.score_users)
        items, behaviours = corpus.windows(batch_users, corpus.lengths[batch_users], args.max_len)
        scorer.top_k(items, behaviours, args.k)
        latencies = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            scorer.top_k(items, behaviours, args.k)
            latencies.append(time.perf_counter() - started)
        return trainer, report.sequences_per_second, report.seconds, latencies

    chosen = [name.strip() for name in args.options.split(",") if name.strip()]
    options = {}
    for name in chosen:
        _, per_s, _, option_latencies = measure(*OPTIONS[name])
        options[name] = {
            "train_sequences_per_s": round(per_s, 1),
            "score_top_k_ms_p50": round(1000 * float(np.median(option_latencies)), 2),
        }
    trainer, sequences_per_second, seconds, latencies = measure({}, {})

    users = np.arange(args.users)
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for start in range(0, args.users, args.batch_size):
        trainer._batch(corpus, users[start : start + args.batch_size])
    vectorised = (time.perf_counter() - started) / args.users
    sample = users[: min(args.users, 1024)]
    started = time.perf_counter()
    for start in range(0, sample.size, args.batch_size):
        loop_batch(corpus, sample[start : start + args.batch_size], args.max_len + 1, args.items, rng)
    looped = (time.perf_counter() - started) / sample.size

    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "shape": vars(args),
        "load_average_before": load_before,
        "train_sequences_per_s": round(sequences_per_second, 1),
        "seconds_per_epoch": round(seconds, 2),
        "batch_build_share": round(vectorised * args.users / seconds, 4),
        "batch_build_us_per_sequence_vectorised": round(vectorised * 1e6, 1),
        "batch_build_us_per_sequence_python_loop": round(looped * 1e6, 1),
        "batch_build_speedup": round(looped / vectorised, 1),
        "score_top_k_ms_p50": round(1000 * float(np.median(latencies)), 2),
        "score_top_k_ms_p90": round(1000 * float(np.percentile(latencies, 90)), 2),
        "options": options,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
