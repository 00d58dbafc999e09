"""`casm serve` end to end on the test broker: recommendations reflect each user's newest event,
fine-tuning moves a user's ranking towards the cluster their events point at, new items become
recommendable after the next fine-tune."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from casm_core.model import CASM
from casm_core.scoring import Scorer
from consumers.serve.service import Service
from consumers.settings import CasmSettings
from stream.clients import make_producer, read_topic
from stream.topics import ensure_topics

pytestmark = pytest.mark.integration


def service_settings(tmp_path: Path, kafka_config, topic_names, drift: dict | None = None, **serve) -> CasmSettings:
    return CasmSettings(
        drift=drift or {},
        kafka=kafka_config,
        topics=topic_names,
        store={"path": tmp_path / "state.duckdb", "sequence_length": 11},
        model={"hidden_dim": 16, "context_dim": 8, "ffn_dim": 16, "max_len": 10, "dropout": 0.0},
        train={"batch_size": 32, "learning_rate": 0.01, "seed": 0},
        serve={
            "checkpoint_dir": tmp_path / "checkpoints",
            "metrics_port": None,
            "training": "deterministic",
            "deterministic_round_events": 10**9,  # rounds only when a test asks for one
            "min_events_to_train": 1,
            "refresh_max_delay_ms": 0,
            "top_k": 5,
            **serve,
        },
        progress=False,
    )


def produce(bootstrap: str, settings: CasmSettings, events: list[dict]) -> dict[str, tuple[int, int]]:
    """Send events keyed by user; returns each user's newest (partition, offset)."""
    producer = make_producer(settings.kafka, bootstrap)
    newest: dict[str, tuple[int, int]] = {}
    futures = [
        (e["user_id"], producer.send(settings.topics.behaviours, key=e["user_id"].encode(), value=json.dumps(e).encode()))
        for e in events
    ]
    producer.flush()
    for user, future in futures:
        meta = future.get(timeout=10)
        newest[user] = (meta.partition, meta.offset)
    producer.close()
    return newest


def cluster_events(num_users: int, cluster: range, prefix: str, seed: int, start: float) -> list[dict]:
    rng = np.random.default_rng(seed)
    events = []
    for user in range(num_users):
        for step in range(8):
            events.append({
                "user_id": f"{prefix}{user}",
                "item_id": f"item{int(rng.choice(cluster))}",
                "behavior": "pv" if step % 4 else "cart",
                "timestamp": start + len(events),
            })
    return events


def service_on(bootstrap: str, settings: CasmSettings, events: list[dict]) -> Service:
    """The topics made, `events` produced, and a service built on them (not started)."""
    ensure_topics(bootstrap, settings.kafka, settings.topics)
    produce(bootstrap, settings, events)
    return Service(settings, bootstrap)


def run_until(service: Service, condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        service.step()


def fine_tune(service: Service, steps: int = 25) -> None:
    """One training round of `steps` steps now, waited for (deterministic mode)."""
    service.trainer.run_round(service.report.events_applied, steps=steps)


def cluster_rank_gap(scorer: Scorer, service: Service, user: str, cluster_a: range, cluster_b: range) -> float:
    """Mean rank of cluster-B items minus that of cluster-A items for `user` (> 0: A ranked higher)."""
    seqs = service.store.sequences([user], width=10)
    scores = scorer.score_all(seqs.items, seqs.behaviours)[0].numpy()
    ids = service.store.item_ids()
    order = np.argsort(-scores[1:])  # ranks of items 1..n
    ranks = np.empty_like(order)
    ranks[order] = np.arange(order.size)
    rank_of = {ids[i]: ranks[i] for i in range(len(ids))}
    mean = lambda cluster: float(np.mean([rank_of[f"item{i}"] for i in cluster if f"item{i}" in rank_of]))  # noqa: E731
    return mean(cluster_b) - mean(cluster_a)


def test_serve_publishes_fresh_recommendations_and_learns_clusters(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, kafka_config, topic_names)
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    cluster_a, cluster_b = range(0, 12), range(12, 24)
    events = cluster_events(30, cluster_a, "a", 1, 1.7e9) + cluster_events(30, cluster_b, "b", 2, 1.7e9 + 1e4)
    probe = [{"user_id": "probe", "item_id": f"item{i}", "behavior": "pv", "timestamp": 1.7e9 + 2e4 + i} for i in (1, 4, 7)]
    newest = produce(kafka_bootstrap, settings, events + probe)

    service = Service(settings, kafka_bootstrap)
    try:
        run_until(service, lambda: service.report.events_applied == len(events) + len(probe) and service.publisher.pending == 0)
        assert service.publisher.popularity_fallbacks == service.publisher.recommendations  # no model yet
        assert service.trainer.ready(wait_s=60)
        torch.manual_seed(0)
        untrained = Scorer(
            CASM(settings.model, service.store.num_items(), len(service.store.behaviour_names())),
            service.serving.target,
        )
        before = cluster_rank_gap(untrained, service, "probe", cluster_a, cluster_b)

        for version in range(1, 5):
            fine_tune(service)
            assert service.serving.version == version
        after = cluster_rank_gap(service.serving.scorer, service, "probe", cluster_a, cluster_b)
        assert after > before + 3, (before, after)
        assert after > 6  # of 24 items: cluster A clearly on top

        # The probe user acts again: the refreshed recommendation comes from the model.
        newest.update(produce(kafka_bootstrap, settings, [
            {"user_id": "probe", "item_id": "item2", "behavior": "cart", "timestamp": 1.7e9 + 3e4}
        ]))
        run_until(service, lambda: service.report.events_applied == len(events) + len(probe) + 1 and service.publisher.pending == 0)
    finally:
        service.stop()
        service.run(until=lambda s: True)  # runs the shutdown path

    records = read_topic(settings.kafka, kafka_bootstrap, settings.topics.recommendations, timeout_s=30)
    last: dict[str, dict] = {}
    for record in records:
        last[record.key.decode()] = json.loads(record.value)  # offset order within a user's partition
    assert set(last) == {e["user_id"] for e in events} | {"probe"}
    for user, (partition, offset) in newest.items():
        assert (last[user]["event_partition"], last[user]["event_offset"]) == (partition, offset), user
        assert last[user]["event_produced_ms"] is not None
    probe_rec = last["probe"]
    assert probe_rec["source"] == "model" and probe_rec["model_version"] == "4"
    assert sum(item["item_id"] in {f"item{i}" for i in cluster_a} for item in probe_rec["items"]) >= 4
    # Every version was registered with its checkpoint; the last few are kept on disk.
    with service_store(settings) as store:
        models = store.registry.models()
        assert [m["version"] for m in models] == [1, 2, 3, 4]
        assert all(Path(m["checkpoint_path"]).name == f"casm-v{m['version']:06d}.pt" for m in models)
        assert store.registry.last_published(["probe"])["probe"]["model_version"] == 4
    assert len(list((tmp_path / "checkpoints").glob("*.pt"))) == settings.serve.keep_checkpoints


def service_store(settings: CasmSettings):
    from consumers.serve.service import open_store

    return open_store(settings)


def test_a_new_item_is_recommendable_after_the_next_fine_tune(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, kafka_config, topic_names)
    cluster = range(0, 12)
    service = service_on(kafka_bootstrap, settings, cluster_events(30, cluster, "a", 5, 1.7e9))
    try:
        run_until(service, lambda: service.report.events_applied == 240 and service.publisher.pending == 0)
        assert service.trainer.ready(wait_s=60)
        fine_tune(service, steps=30)
        assert service.serving.version == 1

        # "fresh" appears: the cluster's users view it again and again.
        fresh = [
            {"user_id": f"a{u}", "item_id": "fresh", "behavior": "pv" if r else "cart", "timestamp": 1.7e9 + 1e5 + 10 * u + r}
            for u in range(30) for r in range(3)
        ]
        produce(kafka_bootstrap, settings, fresh)
        run_until(service, lambda: service.report.events_applied == 240 + len(fresh) and service.publisher.pending == 0)
        index = service.store.item_index(["fresh"])[0]
        assert index > service.serving.num_items  # not a candidate of the serving model yet

        for _ in range(3):
            fine_tune(service, steps=30)
        assert service.serving.num_items >= index
        seqs = service.store.sequences(["a0"], width=10)
        scores, best = service.serving.scorer.top_k(seqs.items, seqs.behaviours, k=5)
        assert np.isfinite(scores).all()
        assert index in best[0].tolist(), (index, best)
    finally:
        service.stop()
        service.run(until=lambda s: True)


def test_the_recent_baseline_is_served_through_the_same_path_without_training(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, kafka_config, topic_names, recommender="recent",
                                deterministic_round_events=1, exclude_behaviours=["cart"])
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    events = [
        {"user_id": f"u{u}", "item_id": f"item{u + s}", "behavior": "cart" if s == 1 else "pv", "timestamp": 1.7e9 + 10 * u + s}
        for u in range(3) for s in range(4)
    ]
    produce(kafka_bootstrap, settings, events)
    service = Service(settings, kafka_bootstrap)
    try:
        run_until(service, lambda: service.report.events_applied == len(events) and service.publisher.pending == 0)
        assert service.trainer.ready(wait_s=60)
        service.step()  # a round is due after every event, were this the model
        assert service.trainer.versions_adopted == 0
    finally:
        service.stop()
        service.run(until=lambda s: True)
    with service_store(settings) as store:
        assert store.registry.models() == []
    last = {r.key.decode(): json.loads(r.value)
            for r in read_topic(settings.kafka, kafka_bootstrap, settings.topics.recommendations, timeout_s=30)}
    items = [i["item_id"] for i in last["u0"]["items"]]
    assert last["u0"]["source"] == "recent" and last["u0"]["model_version"] == "0"
    # The window newest first without the cart item (item1), then the most popular left (item4).
    assert items == ["item3", "item2", "item0", "item4", "item5"]


def test_drift_detector_state_is_the_same_after_a_sigterm_restart(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    import signal as signals

    # Conversion outcomes resolve within this small log.
    settings = service_settings(tmp_path, kafka_config, topic_names, drift={"horizon_s": 5.0})
    events = cluster_events(20, range(0, 12), "a", 7, 1.7e9)
    service = service_on(kafka_bootstrap, settings, events)
    service.install_signal_handlers()
    try:
        run_until(service, lambda: service.report.events_applied == len(events) and service.publisher.pending == 0)
        assert service.trainer.ready(wait_s=60)
        fine_tune(service)  # a model, so that hits are scored too
        more = cluster_events(20, range(0, 12), "a", 8, 1.7e9 + 1e3)
        produce(kafka_bootstrap, settings, more)
        run_until(service, lambda: service.report.events_applied == len(events) + len(more)
                  and service.publisher.pending == 0)
        os.kill(os.getpid(), signals.SIGTERM)  # the handler asks the loop to stop
        service.run()
    finally:
        signals.signal(signals.SIGTERM, signals.SIG_DFL)
        signals.signal(signals.SIGINT, signals.default_int_handler)
    before = service.signals.monitor
    assert service.stopped_by == "SIGTERM"
    def updates(monitor) -> dict[tuple[str, str], int]:
        return {(kind, b): monitor.detectors.updates(kind, b)
                for kind in ("hit", "conversion") for b in settings.behaviours.names}

    assert sum(updates(before).values()) > 0 and service.signals.events_scored > 0  # it had seen something

    restarted = Service(settings, kafka_bootstrap)
    try:
        after = restarted.signals.monitor
        assert after is not before
        assert updates(after) == updates(before)
        assert after.conversion.pending == before.conversion.pending
        assert len(after.detections) == len(before.detections)
        assert restarted.signals.events_scored == service.signals.events_scored
        # The detectors' inner state is back as it was: fed the same values, they answer alike.
        change = [1.0] * 200 + [0.0] * 200  # an abrupt change, so that they fire
        answers = {key: ([before.detectors.update(*key, v) for v in change],
                         [after.detectors.update(*key, v) for v in change]) for key in updates(before)}
        assert all(old == new for old, new in answers.values())
        assert any(any(old) for old, _ in answers.values())
    finally:
        restarted.stop()
        restarted.run(until=lambda s: True)


def test_a_dead_trainer_is_restarted_from_its_checkpoint_and_ingestion_goes_on(
    kafka_bootstrap: str, kafka_config, topic_names, tmp_path: Path
) -> None:
    settings = service_settings(tmp_path, kafka_config, topic_names)
    events = cluster_events(10, range(0, 12), "a", 9, 1.7e9)
    service = service_on(kafka_bootstrap, settings, events)
    try:
        run_until(service, lambda: service.report.events_applied == len(events) and service.publisher.pending == 0)
        assert service.trainer.ready(wait_s=60)
        fine_tune(service)
        assert service.serving.version == 1
        os.kill(service.trainer.worker.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while service.trainer.worker.alive:
            assert time.monotonic() < deadline, "the trainer outlived SIGKILL"
            time.sleep(0.05)
        more = cluster_events(10, range(0, 12), "a", 10, 1.7e9 + 1e3)
        produce(kafka_bootstrap, settings, more)
        run_until(service, lambda: service.report.events_applied == len(events) + len(more))  # no exception
        assert service.trainer.restarts == 1
        run_until(service, lambda: service.trainer.ready(), timeout_s=120)
        fine_tune(service)  # the new process resumed from version 1's checkpoint
        assert service.serving.version == 2
    finally:
        service.stop()
        service.run(until=lambda s: True)
    with service_store(settings) as store:
        assert [m["version"] for m in store.registry.models()] == [1, 2]
