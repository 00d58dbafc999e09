"""The alpha flow: a changed alpha reaches the trainer's next step (the TrainedVersion carries the
alpha it trained with, and the registry records it), and it survives a restart: the trainer link
reads the store's alpha history back when it starts (`TrainerLink.initialize`)."""

from __future__ import annotations

import time
from pathlib import Path

from consumers.serve.service import open_store
from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from consumers.training.link import TrainerLink
from consumers.training.worker import TrainedVersion, TrainerPlan
from tests.consumers.training.test_worker import BEHAVIOURS, MODEL, feed, started
from tests.state._synth import events

DEADLINE_S = 120.0  # a trainer process answers in seconds; only a hung one takes this long
CHANGED = {"pv": 0.125, "buy": 1.0}  # differs from BEHAVIOURS' pv 0.5 by far more than 1e-3


def test_the_next_step_trains_with_the_alpha_of_its_feed() -> None:
    worker = started(TrainerPlan(mode="deterministic"))
    try:
        worker.feed(feed(steps=3))
        first = [r for r in worker.wait_version(DEADLINE_S) if isinstance(r, TrainedVersion)]
        changed = feed(steps=3)
        changed.alpha = dict(CHANGED)
        worker.feed(changed)
        second = [r for r in worker.wait_version(DEADLINE_S) if isinstance(r, TrainedVersion)]
    finally:
        worker.close(timeout_s=10)
    assert [v.alpha for v in first] == [BEHAVIOURS["alpha"]]
    assert [v.alpha for v in second] == [CHANGED]


def settings_for(tmp_path: Path) -> CasmSettings:
    return CasmSettings(
        behaviours=BEHAVIOURS,
        store={"path": tmp_path / "state.duckdb", "sequence_length": 8},
        model=MODEL,
        train={"batch_size": 16, "seed": 0},
        serve={"checkpoint_dir": tmp_path / "checkpoints", "metrics_port": None, "training": "deterministic",
               "min_events_to_train": 1, "worker_timeout_s": DEADLINE_S},
        progress=False,
    )


class Alpha:
    """The service's alpha as the link reads it (`Service.current_alpha`), changed the way
    `Service.set_alpha` changes it: the new value for the next round, recorded in the store."""

    def __init__(self, store, start: dict[str, float]) -> None:
        self.store = store
        self.value = dict(start)

    def __call__(self) -> dict[str, float]:
        return dict(self.value)

    def set(self, alpha: dict[str, float], reason: str) -> None:
        self.value = {**self.value, **alpha}
        self.store.registry.record_alpha(time.time(), self.value, reason)


def a_round(link: TrainerLink, users: list[str], applied: int) -> None:
    link.touched(users, applied)
    link.run_round(applied, steps=3)


def test_a_changed_alpha_is_trained_with_registered_and_restored_after_a_restart(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    users = [f"u{k}" for k in range(8)]
    rows = [{"user_id": u, "item_id": f"i{(k * 7 + n) % 20}", "behavior": "pv" if n % 3 else "buy", "offset": k * 6 + n}
            for k, u in enumerate(users) for n in range(6)]

    store = open_store(settings)
    store.apply(events(rows))
    alpha = Alpha(store, BEHAVIOURS["alpha"])
    link = TrainerLink(settings, store, ServingModel(settings), ServiceMetrics(10.0), alpha)
    try:
        version, start_alpha = link.initialize()
        assert (version, start_alpha) == (0, BEHAVIOURS["alpha"])  # nothing in the history yet
        assert link.ready(wait_s=DEADLINE_S)
        a_round(link, users, len(rows))
        alpha.set({"pv": CHANGED["pv"]}, "test: drift")
        a_round(link, users, len(rows))
    finally:
        link.close()
    assert [(m["version"], m["alpha"]) for m in store.registry.models()] == [(1, BEHAVIOURS["alpha"]), (2, CHANGED)]
    store.close()

    # A restart: a new store handle and trainer link, configured with the original alpha.
    store = open_store(settings)
    restarted = Alpha(store, {})
    link = TrainerLink(settings, store, ServingModel(settings), ServiceMetrics(10.0), restarted)
    try:
        version, start_alpha = link.initialize()
        assert (version, start_alpha) == (2, CHANGED)  # the alpha history, not the settings
        restarted.value = dict(start_alpha)  # what the service then serves as its current alpha
        assert link.ready(wait_s=DEADLINE_S)
        a_round(link, users, len(rows))
    finally:
        link.close()
    assert store.registry.latest_model()["version"] == 3 and store.registry.latest_model()["alpha"] == CHANGED
    store.close()
