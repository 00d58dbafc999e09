"""The trainer process: it keeps to its budget (steps per second, CPU share), trains exactly the
steps a deterministic feed names, and dies with its parent without writing another checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from consumers.training.worker import (
    TrainedVersion,
    TrainerPlan,
    TrainingFeed,
    TrainingWorker,
    WorkerInit,
)

ITEMS = [f"i{k}" for k in range(50)]
BEHAVIOURS = {"names": ["pv", "buy"], "target": "buy", "alpha": {"pv": 0.5, "buy": 1.0}}
MODEL = {"hidden_dim": 8, "context_dim": 4, "ffn_dim": 8, "max_len": 6, "dropout": 0.0}


def init(plan: TrainerPlan, checkpoint_dir: Path | None = None) -> WorkerInit:
    return WorkerInit(model_config=MODEL, train_config={"batch_size": 16, "seed": 0}, behaviours=BEHAVIOURS,
                      item_ids=ITEMS, device="cpu", threads=1, plan=plan, first_version=1,
                      checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir))


def feed(steps: int | None = None, users: int = 64) -> TrainingFeed:
    rng = np.random.default_rng(0)
    return TrainingFeed(keys=[f"u{u}" for u in range(users)], items=rng.integers(1, 51, (users, 7)),
                        behaviours=rng.integers(1, 3, (users, 7)), new_item_ids=[], behaviour_names=["pv", "buy"],
                        alpha={"pv": 0.5, "buy": 1.0}, events_applied=1000, steps=steps)


def started(plan: TrainerPlan, checkpoint_dir: Path | None = None) -> TrainingWorker:
    worker = TrainingWorker()
    worker.initialize(init(plan, checkpoint_dir))
    assert worker.poll_ready(timeout_s=120)
    return worker


def versions_for(worker: TrainingWorker, seconds: float) -> list[TrainedVersion]:
    deadline, found = time.monotonic() + seconds, []
    while time.monotonic() < deadline:
        found += [r for r in worker.poll(0.2) if isinstance(r, TrainedVersion)]
    return found


def test_the_trainer_keeps_to_its_steps_per_second() -> None:
    worker = started(TrainerPlan(mode="continuous", cpu_share=0.0, max_steps_per_s=20.0,
                                 publish_every_steps=10**6, publish_every_s=0.5))
    try:
        worker.feed(feed())
        versions = versions_for(worker, 4.0)[1:]  # the first version includes the feed's arrival
    finally:
        worker.close(timeout_s=10)
    steps, seconds = sum(v.steps for v in versions), sum(v.seconds for v in versions)
    assert len(versions) >= 4
    # Stated in BENCHMARKS.md: never above the cap (+10 %), at least half of it on a busy 2-core machine.
    assert 10.0 <= steps / seconds <= 22.0, (steps, seconds)


def test_the_trainer_keeps_to_its_cpu_share() -> None:
    worker = started(TrainerPlan(mode="continuous", cpu_share=0.2, publish_every_steps=10**6, publish_every_s=0.5))
    try:
        worker.feed(feed())
        versions = versions_for(worker, 4.0)[1:]
    finally:
        worker.close(timeout_s=10)
    cpu, wall = sum(v.cpu_seconds for v in versions), sum(v.seconds for v in versions)
    assert versions and sum(v.steps for v in versions) > 0
    assert cpu / wall <= 0.2 * 1.3, (cpu, wall)  # the reader thread and sends cost a little


def test_a_deterministic_feed_trains_exactly_its_steps_and_publishes_once() -> None:
    worker = started(TrainerPlan(mode="deterministic"))
    try:
        worker.feed(feed(steps=7))
        first = [r for r in worker.wait_version(60) if isinstance(r, TrainedVersion)]
        worker.feed(feed(steps=0))
        quiet = worker.poll(1.0)
        worker.feed(feed(steps=3))
        second = [r for r in worker.wait_version(60) if isinstance(r, TrainedVersion)]
        lonely = feed(steps=4, users=1)
        fresh = TrainingWorker()
        fresh.initialize(init(TrainerPlan(mode="deterministic")))
        assert fresh.poll_ready(timeout_s=120)
        lonely.items[:, :-1] = 0  # one event: no training position
        fresh.feed(lonely)
        answer = fresh.wait_version(60)
        fresh.close(timeout_s=10)
    finally:
        worker.close(timeout_s=10)
    assert [(v.version, v.steps, v.steps_total) for v in first] == [(1, 7, 7)]
    assert quiet == []
    assert [(v.version, v.steps, v.steps_total) for v in second] == [(2, 3, 10)]
    assert first[0].alpha == {"pv": 0.5, "buy": 1.0} and first[0].events_applied == 1000
    assert [type(a).__name__ for a in answer] == ["NothingTrained"]  # answered at once, not after the timeout


PARENT = """
import sys, time
sys.path.insert(0, {root!r})
from tests.consumers.training.test_worker import started, feed
from consumers.training.worker import TrainerPlan
from pathlib import Path
worker = started(TrainerPlan(mode="continuous", cpu_share=0.0, publish_every_s=0.2), Path({folder!r}))
worker.feed(feed())
time.sleep(1.5)
print(worker.pid, flush=True)
import os; os._exit(0)  # as a SIGKILL would: no goodbye to the trainer
"""


def test_the_trainer_dies_with_its_parent_and_writes_no_checkpoint_after(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[3])
    out = subprocess.run([sys.executable, "-c", PARENT.format(root=root, folder=str(tmp_path))],
                         capture_output=True, text=True, timeout=180, check=True)
    child = int(out.stdout.split()[-1])
    gone_at = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            gone_at = time.monotonic()
            break
        time.sleep(0.1)
    assert gone_at is not None, "the trainer outlived its parent"
    written = sorted(tmp_path.glob("casm-v*.pt"))
    assert written  # it did checkpoint while the parent lived
    time.sleep(1.0)
    assert sorted(tmp_path.glob("casm-v*.pt")) == written


@pytest.mark.parametrize("mode", ["continuous", "deterministic"])
def test_stop_publishes_what_was_trained_since_the_last_version(mode: str) -> None:
    worker = started(TrainerPlan(mode=mode, cpu_share=0.0, publish_every_steps=10**6, publish_every_s=3600))
    worker.feed(feed(steps=5 if mode == "deterministic" else None))
    if mode == "deterministic":
        worker.wait_version(60)
    else:
        time.sleep(1.0)
    last = [r for r in worker.close(timeout_s=30) if isinstance(r, TrainedVersion)]
    assert (len(last) == 1 and last[0].steps > 0) if mode == "continuous" else last == []
