"""The service's side of the trainer process: builds it from the store, feeds it the newest
windows of touched users, adopts the versions it sends (serving model, registry, checkpoints,
metrics), hands gradient similarities to the drift policy, and restarts it when it dies.

Everything here runs on the ingest thread, except `request_similarity` (any thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from consumers.training.sampling import sample_training_sequences
from consumers.training.worker import (
    NothingTrained,
    Similarity,
    TrainedVersion,
    TrainerPlan,
    TrainingFeed,
    TrainingWorker,
    WorkerError,
    WorkerInit,
    deterministic_steps,
)
from state.store import StateStore

log = logging.getLogger(__name__)

CHECKPOINT_GLOB = "casm-v*.pt"
# A dead or never-ready trainer process is closed quickly: there is nothing left to collect.
DEAD_CLOSE_S = 1.0
NOT_READY_CLOSE_S = 5.0


def trainer_plan(settings: CasmSettings) -> TrainerPlan:
    """The trainer's plan from the settings (mode, budget, replay mix, publishing, similarity)."""
    cfg = settings.serve
    return TrainerPlan(
        mode=cfg.training,
        cpu_share=cfg.trainer_cpu_share,
        max_steps_per_s=cfg.trainer_max_steps_per_s,
        publish_every_steps=cfg.publish_every_steps,
        publish_every_s=cfg.publish_every_s,
        recent_share=cfg.replay_recent_share,
        recent_users=cfg.replay_recent_users,
        reservoir_users=cfg.replay_reservoir_users,
        similarity_every_steps=settings.drift.gradient_every_steps if settings.drift.policy == "gradient" else 0,
        similarity_rows=settings.drift.gradient_rows,
        seed=settings.train.seed,
    )


class ModelSink(Protocol):
    """Where adopted versions go (the service's `consumers.serve.serving_model.ServingModel`)."""

    @property
    def version(self) -> int: ...

    def load(self, version: int, weights: dict[str, np.ndarray], num_items: int, behaviours: Sequence[str], *,
             alpha: Mapping[str, float] | None = None) -> None: ...


class TrainerLink:
    """Owns the `TrainingWorker` of a service (see the module docstring)."""

    def __init__(
        self,
        settings: CasmSettings,
        store: StateStore,
        serving: ModelSink,
        metrics: ServiceMetrics,
        alpha: Callable[[], dict[str, float]],
        on_similarity: Callable[[Similarity], None] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.serve
        self.store = store
        self.serving = serving
        self.metrics = metrics
        self.alpha = alpha
        self.on_similarity = on_similarity
        self.training_log: list[dict[str, Any]] = []
        self.versions_adopted = 0
        self.errors = 0
        self.restarts = 0
        self._similarity_wanted = threading.Event()  # set by the publisher thread, taken here
        self._touched: dict[str, None] = {}
        self._events_since_feed = 0
        self._fed_at = time.monotonic()
        self._carried_steps = 0.0
        self._restart_after = 0.0
        # Started first: the process imports torch while the store opens and the group joins.
        self.worker = TrainingWorker(self.cfg.trainer_niceness)

    @property
    def deterministic(self) -> bool:
        return self.cfg.training == "deterministic"

    # ---------------------------------------------------------------------------- start-up
    def initialize(self) -> tuple[int, dict[str, float]]:
        """Build the trainer from the newest registered checkpoint, an offline one, or scratch.
        Returns (the newest version, the alpha to start with: the configured alpha overlaid by
        the drift policy's latest, which outlives restarts)."""
        behaviours = self.settings.behaviours.model_dump()
        behaviours["names"] = self.store.behaviour_names()
        checkpoint, version = None, 0
        latest = self.store.registry.latest_model()
        if latest and Path(latest["checkpoint_path"]).exists():
            checkpoint, version = latest["checkpoint_path"], int(latest["version"])
            log.info("resuming from model version %d (%s)", version, checkpoint)
        elif latest:
            version = int(latest["version"])
            log.warning("checkpoint of model version %d is missing (%s); training from scratch",
                        version, latest["checkpoint_path"])
        elif self.cfg.initial_checkpoint is not None:
            checkpoint = str(self.cfg.initial_checkpoint)
            log.info("starting from the offline checkpoint %s", checkpoint)
        else:
            log.info("no model yet: the model learns from the stream (popularity until the first version)")
        history = self.store.registry.alpha_history()
        if history:
            behaviours["alpha"] = {**behaviours["alpha"], **history[-1]["alpha"]}
        item_ids = self.store.item_ids()
        self.cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.worker.initialize(WorkerInit(
            model_config=self.settings.model.model_dump(),
            train_config=self.settings.train.model_dump(),
            behaviours=behaviours,
            item_ids=item_ids,
            device=str(self.settings.device),
            threads=self.cfg.trainer_threads,
            plan=trainer_plan(self.settings),
            first_version=version + 1,
            checkpoint_dir=str(self.cfg.checkpoint_dir),
            checkpoint=checkpoint,
        ))
        self._item_count = len(item_ids)
        self._initial_version = version if checkpoint is not None else None
        self._initial_behaviours = list(behaviours["names"])
        self._seeded = False
        return version, dict(behaviours["alpha"])

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether the trainer process is up; when it just came up from a checkpoint, its weights
        become the serving model."""
        if self.worker.ready:
            return True
        try:
            if not self.worker.poll_ready(wait_s):
                return False
        except RuntimeError as exc:  # it died while starting: try again later, ingestion goes on
            self._restart(str(exc))
            return False
        if self._initial_version is not None and self.serving.version < self._initial_version:
            self.serving.load(self._initial_version, self.worker.initial_weights, self.worker.initial_num_items,
                              self._initial_behaviours)
            self.metrics.model_version.set(self._initial_version)
            log.info("serving model version %d", self._initial_version)
        return True

    # ------------------------------------------------------------------------------ feeding
    def touched(self, users: list[str], applied: int) -> None:
        """Users whose windows changed in the batch just applied, and how many events it applied."""
        for user in users:
            self._touched[user] = None
        self._events_since_feed += applied

    def request_similarity(self) -> None:
        """Ask for a gradient-similarity measurement with the next feed (any thread)."""
        self._similarity_wanted.set()

    def _feed(self, users: list[str], events_applied: int, steps: int | None) -> bool:
        """Send the users' windows (and, to a fresh process, the store's seed); False when the
        trainer is gone (it is restarted; ingestion goes on)."""
        try:
            self._feed_now(users, events_applied, steps)
            return True
        except RuntimeError as exc:
            self._restart(str(exc))
            return False

    def _feed_now(self, users: list[str], events_applied: int, steps: int | None) -> None:
        width = self.settings.model.max_len + 1
        if not self._seeded:  # a fresh process: its reservoir starts from the store's users
            sample = sample_training_sequences(
                self.store, self.cfg.replay_reservoir_users, seed=self.settings.train.seed, recent_fraction=0.0,
                min_length=2, width=width)
            if len(sample):
                self._send(sample.user_ids, sample.items, sample.behaviours, events_applied, None, seed=True)
            self._seeded = True
        if users:
            sequences = self.store.sequences(users, width=width)
            items, behaviours = sequences.items, sequences.behaviours
        else:
            items = behaviours = np.zeros((0, width), dtype=np.int64)
        self._send(users, items, behaviours, events_applied, steps)
        self._touched.clear()
        self._events_since_feed = 0
        self._fed_at = time.monotonic()

    def _send(self, keys, items, behaviours, events_applied: int, steps: int | None, seed: bool = False) -> None:
        item_ids = self.store.item_ids() if self.store.num_items() != self._item_count else None
        new_ids = item_ids[self._item_count :] if item_ids is not None else []
        wanted = self._similarity_wanted.is_set() and not seed
        if wanted:
            self._similarity_wanted.clear()
        self.worker.feed(TrainingFeed(
            keys=list(keys), items=items, behaviours=behaviours, new_item_ids=new_ids,
            behaviour_names=self.store.behaviour_names(), alpha=self.alpha(),
            events_applied=events_applied, steps=steps, measure_similarity=wanted, seed=seed,
        ))
        if item_ids is not None:
            self._item_count = len(item_ids)

    def maybe_feed(self, events_applied: int) -> None:
        """Continuous mode: send the touched users' windows when a feed is due."""
        if self.deterministic or not self.worker.ready or events_applied < self.cfg.min_events_to_train:
            return
        if not self._touched:
            return
        due = (self._events_since_feed >= self.cfg.feed_every_events
               or time.monotonic() - self._fed_at >= self.cfg.feed_every_s)
        if due:
            self._feed(list(self._touched), events_applied, None)

    def round_due(self) -> bool:
        """Deterministic mode: whether the events since the last round make a round."""
        return self.deterministic and self._events_since_feed >= self.cfg.deterministic_round_events

    def events_until_round(self) -> int:
        """Deterministic mode: events the next batch may hold before a round is due."""
        return max(0, self.cfg.deterministic_round_events - self._events_since_feed)

    def run_round(self, events_applied: int, steps: int | None = None) -> None:
        """Deterministic mode: feed the touched users with the round's steps (`steps`, or
        `deterministic_steps_per_1000_events` for the events since the last round) and wait for
        the version (rounds before `min_events_to_train` only feed)."""
        if steps is None:
            steps, self._carried_steps = deterministic_steps(
                self._events_since_feed, self.cfg.deterministic_steps_per_1000_events, self._carried_steps)
        if events_applied < self.cfg.min_events_to_train:
            steps = 0
        if not self.worker.ready or not self._feed(list(self._touched), events_applied, steps):
            return  # no trainer now: the round's events stay touched for the next one
        if steps:
            try:
                self._handle(self.worker.wait_version(self.cfg.worker_timeout_s))
            except RuntimeError as exc:
                self._restart(str(exc))

    # ------------------------------------------------------------------------- collecting
    def collect(self) -> None:
        """Adopt what the trainer sent; restart it when it died (after a back-off)."""
        if not self.worker.ready:
            return
        try:
            replies = self.worker.poll()
        except RuntimeError as exc:
            self._restart(str(exc))
            return
        self._handle(replies)

    def _handle(self, replies: list) -> None:
        for reply in replies:
            if isinstance(reply, TrainedVersion):
                self._adopt(reply)
            elif isinstance(reply, Similarity):
                self.metrics.gradient_similarity_seconds.observe(reply.seconds)
                if self.on_similarity is not None:
                    self.on_similarity(reply)
            elif isinstance(reply, NothingTrained):
                log.debug("training round at %d events: no sequence to train on yet", reply.events_applied)
            elif isinstance(reply, WorkerError):
                self.errors += 1
                self.metrics.trainer_errors.inc()
                log.error("the trainer failed a step (ingestion goes on):\n%s", reply.message)

    def _restart(self, reason: str) -> None:
        now = time.monotonic()
        if now < self._restart_after:
            return
        self.errors += 1
        self.restarts += 1
        self.metrics.trainer_errors.inc()
        self.metrics.trainer_restarts.inc()
        self._restart_after = now + self.cfg.trainer_restart_backoff_s
        log.error("the trainer process is gone (%s): starting a new one from the newest checkpoint "
                  "(ingestion goes on)", reason)
        self.worker.close(timeout_s=DEAD_CLOSE_S)
        self.worker = TrainingWorker(self.cfg.trainer_niceness)
        self.initialize()

    def _adopt(self, trained: TrainedVersion) -> None:
        self.serving.load(trained.version, trained.weights, trained.num_items, trained.behaviour_names,
                          alpha=trained.alpha)
        metrics = {
            "loss": trained.loss, "positions": float(trained.positions), "seconds": trained.seconds,
            "steps": float(trained.steps), "steps_total": float(trained.steps_total),
            "steps_per_s": trained.steps_per_s, "cpu_seconds": trained.cpu_seconds,
            "events_applied": float(trained.events_applied),
        }
        metrics.update({f"loss.{b}": v for b, v in trained.loss_by_behaviour.items()})
        self.store.registry.register_model(trained.version, time.time(), trained.alpha, metrics, trained.checkpoint_path or "")
        self._prune_checkpoints()
        self.versions_adopted += 1
        self.training_log.append({"version": trained.version, **metrics})
        self.metrics.model_version.set(trained.version)
        self.metrics.fine_tunes.inc()
        self.metrics.fine_tune_seconds.observe(trained.seconds)
        self.metrics.trainer_steps.inc(trained.steps)
        self.metrics.trainer_steps_per_s.set(trained.steps_per_s)
        self.metrics.train_loss.set(trained.loss)
        for behaviour, value in trained.loss_by_behaviour.items():
            self.metrics.train_loss_by_behaviour.labels(behaviour).set(value)
        log.info("model version %d: %d steps (%.1f/s, %.2f CPU s) loss %.4f on %d positions",
                 trained.version, trained.steps, trained.steps_per_s, trained.cpu_seconds, trained.loss,
                 trained.positions)

    def _prune_checkpoints(self) -> None:
        """Keep the newest `keep_checkpoints` checkpoint files."""
        for old in sorted(self.cfg.checkpoint_dir.glob(CHECKPOINT_GLOB))[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)

    def health(self) -> dict[str, Any]:
        """For /healthz."""
        return {"trainer_alive": self.worker.alive, "trainer_ready": self.worker.ready,
                "trainer_restarts": self.restarts}

    def terminate(self, timeout_s: float) -> None:
        """Stop the trainer process without collecting anything (after a failed start, at the end)."""
        self.worker.close(timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the trainer; the version it publishes on the way out is adopted."""
        if self.worker.ready:
            self._handle(self.worker.close(timeout_s=self.cfg.worker_timeout_s))
        else:
            self.worker.close(timeout_s=NOT_READY_CLOSE_S)
