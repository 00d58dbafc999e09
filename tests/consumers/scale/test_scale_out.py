"""Scale-out on the embedded broker: three ingest instances and a trainer replay 50k events over six
partitions; one ingest instance is killed with SIGKILL mid-run (or, marked slow, paused with
SIGSTOP past its session timeout and resumed: a zombie that finishes the batch it had in hand
after its partitions moved) and a fourth joins later. The survivors' state (union) equals one
single-instance run of the same log, every user has a list reflecting their newest event, and
every instance serves the trainer's newest version within `MODEL_SWAP_S` of its publication."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from consumers.serve.service import open_store
from consumers.serve.status import read_status
from consumers.settings import CasmSettings
from stream.clients import make_producer, read_topic
from stream.config import SyntheticConfig
from stream.replay import parse_pacing, replay
from stream.synthetic import generate
from stream.testing import unique_topics
from stream.topics import ensure_topics

pytestmark = pytest.mark.integration

EVENTS = 50_000
PARTITIONS = 6
MODEL_SWAP_S = 10.0  # the stated time: a published version is served everywhere within this
SESSION_TIMEOUT_MS = 6000
PAUSE_S = 2 * SESSION_TIMEOUT_MS / 1000  # a zombie: paused well past its session timeout
SETTLE_TIMEOUT_S = 300.0
# The last 60 % of the log: 30 % paced with the kill in it (15 s), 20 % paced while the fourth
# instance starts and joins, and the last 10 % only once it holds partitions, so that it joins
# mid-run whatever the machine's speed.
KILL_PART_RATE = "1000/s"
JOIN_PART_RATE = "1000/s"


def env_for(bootstrap: str, settings: CasmSettings, tmp: Path, name: str, role: str, group: str,
            recommendations: str) -> dict[str, str]:
    env = dict(os.environ)
    t = settings.topics
    env.update({
        "CASM_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "CASM_KAFKA__GROUP_ID": group,
        "CASM_KAFKA__SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "CASM_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "CASM_KAFKA__MAX_POLL_RECORDS": "1000",
        "CASM_TOPICS__BEHAVIOURS": t.behaviours,
        "CASM_TOPICS__RECOMMENDATIONS": recommendations,
        "CASM_TOPICS__DEAD_LETTERS": t.dead_letters,
        "CASM_TOPICS__SCORES": t.scores,
        "CASM_TOPICS__CHANGELOG": t.changelog,
        "CASM_TOPICS__MODELS": t.models,
        "CASM_TOPICS__STATUS": t.status,
        "CASM_TOPICS__PARTITIONS": str(PARTITIONS),
        "CASM_STORE__PATH": str(tmp / f"{name}.duckdb"),
        "CASM_STORE__SEQUENCE_LENGTH": "11",
        "CASM_MODEL__MAX_LEN": "10",
        "CASM_MODEL__HIDDEN_DIM": "16",
        "CASM_MODEL__CONTEXT_DIM": "8",
        "CASM_MODEL__FFN_DIM": "16",
        "CASM_SERVE__CHECKPOINT_DIR": str(tmp / f"{name}-checkpoints"),
        "CASM_SERVE__METRICS_PORT": "0",
        "CASM_SERVE__TRAINER_MAX_STEPS_PER_S": "10",
        "CASM_SERVE__PUBLISH_EVERY_S": "2.0",
        "CASM_SCALE__ROLE": role,
        "CASM_SCALE__INSTANCE_ID": name,
        "CASM_SCALE__STATUS_EVERY_S": "1.0",
        "CASM_PROGRESS": "false",
    })
    return env


def start(env: dict[str, str], *extra: str) -> subprocess.Popen:
    log = open(Path(env["CASM_STORE__PATH"]).with_suffix(".log"), "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "consumers.cli", "serve", "--no-create-topics", *extra],
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def state_of(settings: CasmSettings, path: Path) -> dict:
    """Events as (partition, offset) -> (user, item id, behaviour) and sequences by item id."""
    settings = settings.model_copy(deep=True)
    settings.store.path = path
    with open_store(settings, read_only=True) as store:
        ids = ["<pad>", *store.item_ids()]
        names = ["<pad>", *store.behaviour_names()]
        rows = store.con.execute(
            'SELECT "partition", "offset", user_id, item_idx, behaviour_idx FROM events WHERE topic = $1',
            [settings.topics.behaviours],
        ).fetchall()
        users = store.user_ids()
        seqs = store.sequences(users)
        return {
            "events": [((p, o), (u, ids[i], names[b])) for p, o, u, i, b in rows],
            "sequences": {u: (tuple(ids[i] for i in seqs.items[k].tolist()), tuple(names[b] for b in seqs.behaviours[k].tolist()),
                              int(seqs.last_offset[k]))
                          for k, u in enumerate(seqs.user_ids)},
            "partitions": sorted({p for t, p in store.partitions() if t == settings.topics.behaviours}),
        }


def differences(found, expected) -> dict[str, list]:
    """What `found` has that `expected` lacks and the reverse, as sorted lists (empty when equal);
    duplicates count: a row held twice is a difference."""
    have, want = Counter(found), Counter(expected)
    extra, missing = sorted((have - want).elements()), sorted((want - have).elements())
    return {"extra": extra[:20], "missing": missing[:20]} if extra or missing else {}


def log_tail(path: Path, lines: int = 40) -> str:
    return "".join(path.read_text().splitlines(keepends=True)[-lines:]) if path.exists() else ""


@pytest.mark.parametrize("fault", ["kill", pytest.param("pause", marks=pytest.mark.slow)])
def test_three_ingest_instances_and_a_trainer_equal_one_instance(fault: str, kafka_bootstrap: str, kafka_config,
                                                                 tmp_path: Path) -> None:
    topics = unique_topics("scale", partitions=PARTITIONS)
    settings = CasmSettings(kafka=kafka_config, topics=topics, progress=False)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    stream = generate(SyntheticConfig(n_events=EVENTS, n_users=2_000, n_items=1_500, seed=5))
    producer = make_producer(settings.kafka, kafka_bootstrap)
    sent = 0

    def produce(start_row: int, end_row: int, rate: str | None = None) -> None:
        nonlocal sent
        report = replay(stream.events.slice(start_row, end_row - start_row), producer, topics.behaviours,
                        parse_pacing(None, rate, rate is None), progress=False, source_name=f"rows{start_row}")
        sent += report.sent

    group = f"scale-{uuid.uuid4().hex[:8]}"
    env = lambda name, role: env_for(kafka_bootstrap, settings, tmp_path, name, role, group, topics.recommendations)  # noqa: E731
    statuses = lambda: read_status(settings.kafka, kafka_bootstrap, topics.status, timeout_s=30)  # noqa: E731

    def wait_for(check, what: str, timeout_s: float = SETTLE_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = statuses()
            if check(found):
                return found
            time.sleep(1.0)
        logs = "\n".join(f"--- {p.name}\n{log_tail(p)}" for p in sorted(tmp_path.glob("*.log")))
        raise AssertionError(f"{what} not reached in {timeout_s} s: {found}\n{logs}")

    def running_ingest(found: dict, names: set[str]) -> list:
        return [s for n, s in found.items() if n in names and s.state == "running" and s.role == "ingest"]

    processes: dict[str, subprocess.Popen] = {}
    try:
        produce(0, int(EVENTS * 0.4))
        processes["trainer"] = start(env("trainer", "trainer"))
        for name in ("ingest-1", "ingest-2", "ingest-3"):
            processes[name] = start(env(name, "ingest"))

        def covered(found: dict, names: set[str]) -> bool:
            """Each of `names` running and holding partitions, together each partition once."""
            ingest = running_ingest(found, names)
            held = [p for s in ingest for p in s.partitions]
            return sorted(held) == list(range(PARTITIONS)) and len(ingest) == len(names) and all(s.partitions for s in ingest)

        before = wait_for(lambda f: covered(f, {"ingest-1", "ingest-2", "ingest-3"}), "three instances sharing the partitions")
        # The rest of the log at a steady rate in two parts, the kill in the first, the join in the second.
        first = threading.Thread(target=produce, args=(int(EVENTS * 0.4), int(EVENTS * 0.7), KILL_PART_RATE), daemon=True)
        first.start()
        wait_for(lambda f: f["ingest-2"].events_applied > before["ingest-2"].events_applied, "ingest-2 mid-stream",
                 timeout_s=60)
        if fault == "kill":
            processes["ingest-2"].send_signal(signal.SIGKILL)  # its partitions move to the others
            processes["ingest-2"].wait(timeout=30)
            survivors = {"ingest-1", "ingest-3"}
            wait_for(lambda f: covered(f, survivors), "the killed instance's partitions taken over")
        else:
            processes["ingest-2"].send_signal(signal.SIGSTOP)  # batches in hand, partitions soon gone
            paused_at = time.monotonic()
            wait_for(lambda f: covered(f, {"ingest-1", "ingest-3"}), "the paused instance's partitions taken over")
            time.sleep(max(0.0, PAUSE_S - (time.monotonic() - paused_at)))
            processes["ingest-2"].send_signal(signal.SIGCONT)  # it finishes what it had, then rejoins
            survivors = {"ingest-1", "ingest-2", "ingest-3"}
            wait_for(lambda f: covered(f, survivors), "the resumed instance back in the group")
        first.join(timeout=120)
        second = threading.Thread(target=produce, args=(int(EVENTS * 0.7), int(EVENTS * 0.9), JOIN_PART_RATE),
                                  daemon=True)
        second.start()
        processes["ingest-4"] = start(env("ingest-4", "ingest"))  # a fourth joins mid-run
        survivors |= {"ingest-4"}
        wait_for(lambda f: covered(f, survivors), "the fourth instance taking partitions")
        second.join(timeout=120)
        produce(int(EVENTS * 0.9), EVENTS)  # the rest of the log after the join

        def settled(found: dict) -> bool:
            trainer = found.get("trainer")
            ingest = running_ingest(found, survivors)
            # The trainer's count, not its lag: a lag of 0 in its newest record may predate the
            # ingest instances' last changelog records (records are a second apart, high
            # watermarks as old as the last fetch).
            return (covered(found, survivors) and all(s.total_lag == 0 for s in ingest) and trainer is not None
                    and trainer.events_applied == EVENTS and trainer.model_version >= 1
                    and all(s.model_version == trainer.model_version for s in ingest))

        final = wait_for(settled, "all caught up on one model version")
        killed = {"ingest-2"} if fault == "kill" else set()
        for name, process in processes.items():
            if name not in killed:
                process.send_signal(signal.SIGTERM)
        for name, process in processes.items():
            assert process.wait(timeout=120) in (0, -signal.SIGKILL), log_tail(tmp_path / f"{name}.log")
            if name not in killed:
                assert process.returncode == 0, log_tail(tmp_path / f"{name}.log")
        producer.close()
        assert sent == EVENTS

        # The partitions that moved were restored from the changelog, not read again from the input:
        # every event was applied from the input once (the killed instance's last status may lag
        # behind what it applied, hence <=).
        assert sum(final[name].events_restored for name in survivors) > 0
        if fault == "kill":  # (a zombie's batch is applied twice: by it, and by the partition's new owner)
            assert sum(final[name].events_applied for name in survivors) + final["ingest-2"].events_applied <= EVENTS

        # Every ingest instance served the trainer's newest version within MODEL_SWAP_S of its publication.
        version = final["trainer"].model_version
        for status in running_ingest(final, survivors):
            assert status.model_version == version
            assert status.model_loaded_at - status.model_published_at < MODEL_SWAP_S, status

        # One single-instance run of the same log, for reference.
        reference_env = env_for(kafka_bootstrap, settings, tmp_path, "reference", "all", f"{group}-reference",
                                f"{topics.recommendations}-reference")
        reference_process = start(reference_env, "--idle-exit-s", "3")
        assert reference_process.wait(timeout=300) == 0, log_tail(tmp_path / "reference.log")
        reference = state_of(settings, tmp_path / "reference.duckdb")
        assert len(reference["events"]) == EVENTS

        parts = {name: state_of(settings, tmp_path / f"{name}.duckdb") for name in sorted(survivors)}
        held = sorted(p for part in parts.values() for p in part["partitions"])
        assert held == list(range(PARTITIONS))  # each store holds only its partitions, together all
        union = [e for part in parts.values() for e in part["events"]]
        assert len(union) == len({key for key, _ in union}) == EVENTS  # every event exactly once
        assert not differences(union, reference["events"])
        sequences = {u: s for part in parts.values() for u, s in part["sequences"].items()}
        assert not differences(sequences.items(), reference["sequences"].items())  # item ids, behaviours, newest offset
        trainer = state_of(settings, tmp_path / "trainer.duckdb")  # the trainer rebuilt all of it from the changelog
        assert not differences(trainer["events"], reference["events"]), log_tail(tmp_path / "trainer.log", 80)
        assert not differences(trainer["sequences"].items(), reference["sequences"].items())

        # Every user has a list, and the newest one reflects their newest event.
        newest: dict[str, int] = {}
        for record in read_topic(settings.kafka, kafka_bootstrap, topics.recommendations, timeout_s=60):
            value = json.loads(record.value)
            if value.get("event_offset") is not None:
                newest[value["user_id"]] = max(newest.get(value["user_id"], -1), int(value["event_offset"]))
        assert {u: newest.get(u) for u in reference["sequences"]} == {u: s[2] for u, s in reference["sequences"].items()}
    finally:  # never leave an instance behind (a failed check must not keep it reconnecting)
        for process in processes.values():
            if process.poll() is None:
                process.kill()
