"""The publisher's scheduling, through its public methods with a fake producer: touched users are
refreshed in micro-batches bounded by `serve.refresh_max_users` and `serve.refresh_max_delay_ms`,
`submit` blocks while `serve.publisher_queue_batches` signal jobs wait (backpressure), and users
without usable history (everyone before the first model version) get `source: popularity`.

No test here depends on the machine's speed: "due" is decided by the `when` given to `touch`,
threads are awaited on events with generous deadlines, and the one negative wait (a blocked
`submit` must not return) can only pass wrongly on a slow machine, never fail wrongly."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from casm_core.model import CASM
from consumers.serve.publisher import Publisher
from consumers.serve.service import open_store
from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from state.store import StateStore
from stream.models import Recommendation
from tests.consumers.serve.test_publisher import POPULAR, Producer, apply, ids

#: A delay bound no test waits for: users touched "now" are never due by delay alone.
FAR_MS = 3_600_000
#: Deadline for anything a thread does (only a hung publisher takes this long).
DEADLINE_S = 60.0


class RecordingStore:
    """The real store, recording the users of every `sequences` read (one per micro-batch)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self.batches: list[list[str]] = []

    def sequences(self, user_ids, **kwargs):
        self.batches.append(list(user_ids))
        return self._store.sequences(user_ids, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._store, name)


class BlockingSignals:
    """Signal processing that holds each job until `release` is set; records the jobs."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.processed: list[object] = []

    def process(self, job: object) -> None:
        self.started.set()
        assert self.release.wait(DEADLINE_S), "the test never released the job"
        self.processed.append(job)


def make(signals: object | None = None, **serve) -> tuple[Publisher, Producer, RecordingStore, ServingModel]:
    settings = CasmSettings(
        store={"path": ":memory:", "sequence_length": 6},
        model={"max_len": 5, "hidden_dim": 8, "context_dim": 4, "ffn_dim": 8},
        serve={"metrics_port": None, "top_k": 3, "popularity_refresh_s": 1e6, **serve},
        progress=False,
    )
    store = RecordingStore(open_store(settings))
    producer = Producer()
    serving = ServingModel(settings)
    publisher = Publisher(settings, store, producer, serving, ServiceMetrics(10.0), signals)
    return publisher, producer, store, serving


def sent(producer: Producer) -> dict[str, Recommendation]:
    return {key.decode(): Recommendation.model_validate_json(value) for _, key, value in producer.sent}


def test_micro_batches_are_bounded_by_refresh_max_users() -> None:
    publisher, producer, store, _ = make(refresh_max_users=3, refresh_max_delay_ms=FAR_MS)
    now = time.monotonic()
    publisher.touch(["a", "b"], now)
    publisher.work()
    assert producer.sent == [] and publisher.pending == 2  # fewer than 3 and not overdue: wait
    publisher.touch(["c", "d", "e", "f", "g"], now)
    publisher.work()
    # Full batches of 3 in touch order while 3 are pending; the last one keeps waiting.
    assert store.batches == [["a", "b", "c"], ["d", "e", "f"]]
    assert sorted(sent(producer)) == ["a", "b", "c", "d", "e", "f"] and publisher.pending == 1
    publisher.touch(["a"], now)  # touched again: a second list later, once
    publisher.close(DEADLINE_S)  # closing publishes what is left, however small
    assert store.batches[2:] == [["g", "a"]] and publisher.pending == 0


def test_users_are_due_refresh_max_delay_ms_after_their_first_touch() -> None:
    delay_ms = 500
    publisher, producer, store, _ = make(refresh_max_users=100, refresh_max_delay_ms=delay_ms)
    now = time.monotonic()
    publisher.touch(["late"], now - 2 * delay_ms / 1000.0)  # pending for twice the bound
    publisher.touch(["fresh"], now + DEADLINE_S)  # not due for a long while
    publisher.work()
    # Due by the oldest user's delay: the whole micro-batch goes, the fresh user with it.
    assert store.batches == [["late", "fresh"]] and publisher.pending == 0
    publisher.touch(["fresh"], now + DEADLINE_S)
    publisher.touch(["fresh"], now - DEADLINE_S)  # a user keeps its first pending time
    publisher.work()
    assert store.batches == [["late", "fresh"]] and publisher.pending == 1


def test_the_thread_refreshes_a_lone_user_once_its_delay_has_passed() -> None:
    publisher, producer, store, _ = make(refresh_max_users=100, refresh_max_delay_ms=50)
    publisher.start()
    try:
        publisher.touch(["u"], time.monotonic())
        assert publisher.wait_idle(DEADLINE_S)
        assert store.batches == [["u"]] and list(sent(producer)) == ["u"]
    finally:
        publisher.close(DEADLINE_S)


def test_submit_blocks_while_publisher_queue_batches_jobs_wait() -> None:
    signals = BlockingSignals()
    publisher, _, _, _ = make(signals, publisher_queue_batches=2)
    publisher.start()
    try:
        publisher.submit("job-1")
        assert signals.started.wait(DEADLINE_S)  # the thread holds job-1: none is waiting
        publisher.submit("job-2")
        publisher.submit("job-3")  # 2 waiting: the bound
        assert publisher.pending == 2
        returned = threading.Event()
        blocked = threading.Thread(target=lambda: (publisher.submit("job-4"), returned.set()), daemon=True)
        blocked.start()
        assert not returned.wait(0.5), "submit returned while the queue was full"
        assert publisher.pending == 2
        signals.release.set()
        assert returned.wait(DEADLINE_S), "submit did not return once the queue drained"
        assert publisher.wait_idle(DEADLINE_S)
        assert signals.processed == ["job-1", "job-2", "job-3", "job-4"] and publisher.pending == 0
    finally:
        signals.release.set()
        publisher.close(DEADLINE_S)


def _load_a_model(publisher: Publisher, serving: ServingModel, version: int) -> None:
    """Give the serving copy a (random) model over the store's items and behaviours."""
    torch.manual_seed(0)
    behaviours = publisher.store.behaviour_names()
    model = CASM(publisher.settings.model, publisher.store.num_items(), len(behaviours))
    serving.load(version, {k: v.numpy() for k, v in model.state_dict().items()}, model.num_items, behaviours)


def test_popularity_before_the_first_model_and_for_users_without_history() -> None:
    publisher, producer, _, serving = make(recommender="casm")
    apply(publisher, POPULAR + [("u", "a", "pv"), ("u", "b", "cart")])
    publisher.touch(["u", "nobody"], 0.0)
    publisher.work(force=True)
    before = sent(producer)
    # No model version yet: everyone gets the most-popular list, a user with history too.
    assert {user: rec.source for user, rec in before.items()} == {"u": "popularity", "nobody": "popularity"}
    assert ids(before["u"]) == ids(before["nobody"]) == ["x", "y", "z"]
    assert publisher.popularity_fallbacks == 2

    _load_a_model(publisher, serving, version=1)
    producer.sent.clear()
    publisher.touch(["u", "nobody"], 0.0)
    publisher.work(force=True)
    after = sent(producer)
    assert after["u"].source == "model" and after["u"].model_version == "1"
    assert after["nobody"].source == "popularity" and ids(after["nobody"]) == ["x", "y", "z"]
    assert publisher.popularity_fallbacks == 3
    assert np.isfinite([item.score for item in after["u"].items]).all()
