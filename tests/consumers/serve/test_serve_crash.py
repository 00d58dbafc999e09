"""`casm serve` killed with SIGKILL at random moments and restarted ends with the same state as
an uninterrupted run: every event applied exactly once, every touched user has a published
recommendation."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from consumers.serve.service import open_store
from consumers.settings import CasmSettings
from stream.clients import make_producer
from stream.config import SyntheticConfig
from stream.replay import parse_pacing, replay
from stream.synthetic import generate
from stream.topics import ensure_topics

pytestmark = pytest.mark.integration

EVENTS = 6_000
KILLS = 4


def serve_env(bootstrap: str, settings: CasmSettings, store: Path, run: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CASM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        # A fresh group per start: the killed member would otherwise hold its partitions until
        # its session times out. Offsets come from the store either way.
        "CASM_KAFKA__GROUP_ID": f"crash-{run}",
        "CASM_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "CASM_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "CASM_KAFKA__MAX_POLL_RECORDS": "50",
        "CASM_TOPICS__BEHAVIOURS": settings.topics.behaviours,
        "CASM_TOPICS__RECOMMENDATIONS": settings.topics.recommendations,
        "CASM_TOPICS__DEAD_LETTERS": settings.topics.dead_letters,
        "CASM_STORE__PATH": str(store),
        "CASM_STORE__SEQUENCE_LENGTH": "11",
        "CASM_MODEL__MAX_LEN": "10",
        "CASM_MODEL__HIDDEN_DIM": "16",
        "CASM_MODEL__CONTEXT_DIM": "8",
        "CASM_MODEL__FFN_DIM": "16",
        "CASM_SERVE__CHECKPOINT_DIR": str(store.parent / f"{store.stem}-checkpoints"),
        "CASM_SERVE__METRICS_PORT": "0",
        "CASM_SERVE__TRAINER_MAX_STEPS_PER_S": "5",  # training (and checkpoints) while it is killed
        "CASM_SERVE__PUBLISH_EVERY_S": "1.0",
        "CASM_PROGRESS": "false",
    })
    return env


def start_serve(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve", "--idle-exit-s", "4", "--no-create-topics"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_assigned(process: subprocess.Popen, timeout_s: float) -> list[str]:
    """Read the service's log until it has its partitions; the lines read so far."""
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        for line in process.stderr:
            lines.append(line)
            if "resuming at stored offsets" in line:
                found.set()
                return

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert found.wait(timeout_s), "".join(lines[-20:])
    return lines


def snapshot(settings: CasmSettings, store_path: Path) -> dict:
    settings = settings.model_copy(deep=True)
    settings.store.path = store_path
    with open_store(settings, read_only=True) as store:
        stats = store.stats()
        users = sorted(store.user_ids())
        seqs = store.sequences(users)
        # Item numbers follow the composition of Kafka batches, which differs between runs:
        # compare by external id.
        ids = ["<pad>", *store.item_ids()]
        popularity = store.item_popularity()
        return {
            "stats": {k: stats[k] for k in ("users", "items", "events_applied")},
            "offsets": store.all_offsets(),
            "items": sorted(ids[1:]),
            "popularity": {ids[i]: int(n) for i, n in enumerate(popularity.tolist()) if i},
            "sequences": {u: ([ids[i] for i in seqs.items[k].tolist()], seqs.behaviours[k].tolist(), int(seqs.n_events[k]))
                          for k, u in enumerate(seqs.user_ids)},
            "published": sorted(store.registry.last_published(users)),
        }


def test_serve_survives_sigkill_with_exactly_once_state(kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path) -> None:
    settings = CasmSettings(kafka=kafka_config, topics=topic_names, progress=False)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    stream = generate(SyntheticConfig(n_events=EVENTS, n_users=300, n_items=400, seed=3))
    producer = make_producer(settings.kafka, kafka_bootstrap)
    # The log grows by one part before each start, so every kill but the last is mid-stream
    # however fast the machine is (the part in hand may or may not be applied yet).
    part = EVENTS // (KILLS + 1)
    sent = 0

    def produce_part(run: int) -> None:
        nonlocal sent
        rows = stream.events.slice(run * part, EVENTS - run * part if run == KILLS else part)
        report = replay(rows, producer, settings.topics.behaviours, parse_pacing(None, None, True), progress=False,
                        source_name=f"part{run}")
        sent += report.sent

    rng = random.Random(11)
    crashed = tmp_path / "crashed.duckdb"
    kills = 0
    applied_at_kill: list[int] = []
    for run in range(KILLS + 1):
        produce_part(run)
        process = start_serve(serve_env(kafka_bootstrap, settings, crashed, f"run{run}"))
        if run < KILLS:
            wait_assigned(process, timeout_s=120)
            time.sleep(rng.uniform(0.0, 1.5))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait(timeout=30)
            # After every kill: the offsets stored are exactly the events held (all are valid, so
            # each partition's next offset counts its applied events).
            state = snapshot(settings, crashed)
            applied_at_kill.append(state["stats"]["events_applied"])
            assert sum(state["offsets"].values()) == state["stats"]["events_applied"]
            assert sum(n for _, _, n in state["sequences"].values()) == state["stats"]["events_applied"]
        else:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]
    producer.close()
    assert sent == EVENTS
    assert kills >= KILLS - 1  # a late kill may find the service already finished
    assert all(n < EVENTS for n in applied_at_kill), applied_at_kill  # killed mid-stream
    assert applied_at_kill == sorted(applied_at_kill), applied_at_kill  # nothing applied is ever lost

    reference = tmp_path / "reference.duckdb"  # one uninterrupted run over the same log
    process = start_serve(serve_env(kafka_bootstrap, settings, reference, "reference"))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]

    expected, actual = snapshot(settings, reference), snapshot(settings, crashed)
    assert actual["stats"] == expected["stats"] and actual["stats"]["events_applied"] == EVENTS
    assert actual["offsets"] == expected["offsets"]
    assert actual["items"] == expected["items"]
    assert actual["popularity"] == expected["popularity"]
    assert actual["sequences"] == expected["sequences"]
    # Every touched user got a recommendation (published before or after the kills).
    assert actual["published"] == sorted(expected["sequences"]) == expected["published"]
    assert np.sum([n for _, _, n in actual["sequences"].values()]) == EVENTS
