"""The trainer role: a child process that owns the trainable model, its optimizer and its replay
buffer, trains continuously within a CPU budget, and returns model versions.

Why a process and not a thread: fine-tuning is many small torch ops with Python between them; in
a thread it would hold the GIL often enough to delay ingestion and refresh (freshness p99). In its
own process it competes for CPU only, and the serving loop never waits for it.

Two modes (`serve.training`):

- ``continuous``: the service feeds the newest windows of the users it touched
  (`TrainingFeed`); the trainer keeps them in a `ReplayBuffer` (newest windows + a reservoir of
  older users), takes a step on a mixed batch whenever its budget allows, and publishes a version
  every `publish_every_steps` steps or `publish_every_s` seconds (whichever comes first). The
  budget: CPU seconds per wall second (`trainer_cpu_share`, a share of one core; the trainer sleeps
  after each step to keep to it) and at most `trainer_max_steps_per_s`.
- ``deterministic``: each feed names a number of steps; the trainer takes exactly those, then
  publishes one version. The service feeds every `deterministic_round_events` events and waits
  for the version, so two runs of one log train identically (evaluation at full speed).

Protocol (over a `multiprocessing` pipe, the typed messages below; a reader thread in the child
takes them off the pipe so a feed never waits for a step to end):
    -> WorkerInit               <- Ready or WorkerError
    -> TrainingFeed (any time)  <- TrainedVersion (whenever one is published), Similarity
                                   (when asked, or every `similarity_every_steps`), WorkerError,
                                   NothingTrained (a deterministic feed found nothing to train on)
    -> Stop                     <- Stopped
The child exits when the pipe closes or its parent dies, and never writes a checkpoint after that.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

# How long the child waits for a message when it has nothing to train on.
_IDLE_WAIT_S = 0.5
# Feeds waiting for the parent's sender thread before `feed` waits (bounded memory); the child's
# reader drains the pipe continuously, so this fills only when the child is gone or starved.
OUTBOX_FEEDS = 8


@dataclass
class TrainerPlan:
    """How the trainer trains: mode, budget, replay mix and publishing (from `serve`)."""

    mode: Literal["continuous", "deterministic"] = "continuous"
    cpu_share: float = 0.5
    max_steps_per_s: float = 0.0
    publish_every_steps: int = 100
    publish_every_s: float = 5.0
    recent_share: float = 0.5
    recent_users: int = 2_048
    reservoir_users: int = 8_192
    similarity_every_steps: int = 0
    similarity_rows: int = 512
    seed: int = 0


@dataclass
class WorkerInit:
    """How the worker builds its trainer (from a checkpoint or from configs, plain dicts) and
    trains; versions are numbered from `first_version`, checkpointed into `checkpoint_dir`."""

    model_config: dict[str, Any]
    train_config: dict[str, Any]
    behaviours: dict[str, Any]
    item_ids: list[str]
    device: str
    threads: int
    plan: TrainerPlan
    first_version: int
    checkpoint_dir: str | None = None
    checkpoint: str | None = None


@dataclass
class TrainingFeed:
    """The newest windows [n, W] (left-padded indices of the store's vocabulary) of users `keys`,
    the store's item ids added since the last feed, the behaviour names, the alpha to train
    with from now on, and the service's applied-event count. `steps`: deterministic mode, train
    exactly this many steps and publish; None in continuous mode. `measure_similarity`: send a
    `Similarity` soon (a detector fired)."""

    keys: list[str]
    items: np.ndarray
    behaviours: np.ndarray
    new_item_ids: list[str]
    behaviour_names: list[str]
    alpha: dict[str, float]
    events_applied: int
    steps: int | None = None
    measure_similarity: bool = False
    seed: bool = False  # the store's users at start-up: reservoir only, not the newest windows


@dataclass
class Stop:
    """Finish: publish what was trained since the last version, answer Stopped, exit."""


@dataclass
class Ready:
    num_items: int
    weights: dict[str, np.ndarray]


@dataclass
class Stopped:
    pass


@dataclass
class WorkerError:
    message: str


@dataclass
class NothingTrained:
    """Deterministic mode: a feed asked for steps, but the buffer holds no sequence to train on
    (no user with two events yet)."""

    events_applied: int


@dataclass
class TrainedVersion:
    """Weights of a version (numpy arrays by state-dict key) and what training did for it."""

    version: int
    weights: dict[str, np.ndarray]
    num_items: int
    behaviour_names: list[str]
    alpha: dict[str, float]
    loss: float
    positions: int
    steps: int  # steps since the previous version
    steps_total: int  # steps of this trainer process so far
    events_applied: int  # the service's count at the newest feed the version saw
    seconds: float  # wall seconds since the previous version
    cpu_seconds: float  # CPU seconds the trainer used for it
    loss_by_behaviour: dict[str, float] = field(default_factory=dict)
    checkpoint_path: str | None = None

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Similarity:
    """Gradient cosine similarity of each behaviour's loss with the target's, measured at
    `steps_total` on a batch of the replay buffer."""

    similarity: dict[str, float]
    steps_total: int
    events_applied: int
    seconds: float


def _build_trainer(init: WorkerInit):
    import torch

    from casm_core.checkpoint import load_checkpoint
    from casm_core.config import BehaviourConfig, ModelConfig, TrainConfig
    from casm_core.trainer import Trainer

    if init.threads:
        torch.set_num_threads(init.threads)
    if init.checkpoint:
        trainer, _ = load_checkpoint(init.checkpoint, device=init.device)
        known = trainer.items.ids()
        if init.item_ids[: len(known)] == known:
            trainer.add_items(init.item_ids[len(known) :])
        else:  # a checkpoint trained elsewhere: adopt the store's numbering
            trainer.reindex_items(init.item_ids)
        trainer.add_behaviours(init.behaviours["names"])
        trainer.set_alpha(init.behaviours.get("alpha", {}))
        return trainer
    return Trainer(
        ModelConfig(**init.model_config),
        TrainConfig(**init.train_config),
        BehaviourConfig(**init.behaviours),
        item_ids=init.item_ids,
        device=init.device,
    )


def _weights(trainer) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in trainer.model.state_dict().items()}


class _TrainerLoop:
    """The child's state: trainer, replay buffer, budget clock, the version being trained."""

    def __init__(self, conn: Connection, init: WorkerInit, parent_pid: int) -> None:
        from casm_core.replay_buffer import ReplayBuffer

        self.conn = conn
        self.plan = init.plan
        self.parent_pid = parent_pid
        self.trainer = _build_trainer(init)
        self.checkpoint_dir = init.checkpoint_dir
        self.buffer = ReplayBuffer(self.trainer.model_cfg.max_len + 1, self.plan.recent_users,
                                   self.plan.reservoir_users, seed=self.plan.seed)
        self.version = init.first_version
        self.events_applied = 0
        self.steps_total = 0
        self._reset_version_stats()
        self.similarity_due = False
        self.steps_at_similarity = 0

    def _reset_version_stats(self) -> None:
        self.steps = 0
        self.losses: list[float] = []
        self.positions = 0
        self.by_behaviour: dict[str, list[float]] = {}
        self.version_started = time.perf_counter()
        self.cpu_started = time.process_time()

    # -------------------------------------------------------------------------- messages
    def apply_feed(self, feed: TrainingFeed) -> None:
        self.trainer.add_items(feed.new_item_ids)
        self.trainer.add_behaviours(feed.behaviour_names)
        self.buffer.add(feed.keys, feed.items, feed.behaviours, recent=not feed.seed)
        self.trainer.set_alpha(feed.alpha)
        self.events_applied = feed.events_applied
        self.similarity_due |= feed.measure_similarity

    def parent_alive(self) -> bool:
        return os.getppid() == self.parent_pid

    # -------------------------------------------------------------------------- training
    def train_step(self) -> bool:
        """One step on a mixed batch; False when the buffer holds nothing to train on."""
        items, behaviours = self.buffer.sample(self.trainer.train_cfg.batch_size, self.plan.recent_share)
        if items.shape[0] == 0:
            return False
        stats = self.trainer.fine_tune(items, behaviours, steps=1)
        if stats.positions == 0:
            return False
        self.steps += 1
        self.steps_total += 1
        self.losses.append(stats.loss)
        self.positions += stats.positions
        for name, value in stats.loss_by_behaviour.items():
            self.by_behaviour.setdefault(name, []).append(value)
        every = self.plan.similarity_every_steps
        if every and self.steps_total - self.steps_at_similarity >= every:
            self.similarity_due = True
        return True

    def measure_similarity(self) -> None:
        started = time.perf_counter()
        items, behaviours = self.buffer.sample(self.plan.similarity_rows, self.plan.recent_share)
        self.similarity_due = False
        self.steps_at_similarity = self.steps_total
        if items.shape[0] == 0:
            return
        similarity = self.trainer.gradient_similarity(items, behaviours, rows=self.plan.similarity_rows)
        if similarity:
            self.conn.send(Similarity(similarity, self.steps_total, self.events_applied, time.perf_counter() - started))

    def publish(self) -> None:
        """Send the weights as the next version (checkpointed first, while the parent lives)."""
        from casm_core.checkpoint import save_checkpoint

        if not self.parent_alive():
            raise SystemExit(0)
        checkpoint = None
        if self.checkpoint_dir:  # written here so the serving loop never waits for the disk
            path = os.path.join(self.checkpoint_dir, f"casm-v{self.version:06d}.pt")
            checkpoint = str(save_checkpoint(self.trainer, path, {"version": self.version}))
        self.conn.send(TrainedVersion(
            version=self.version,
            weights=_weights(self.trainer),
            num_items=len(self.trainer.items),
            behaviour_names=list(self.trainer.behaviours.names),
            alpha=self.trainer.alpha,
            loss=float(np.mean(self.losses)) if self.losses else float("nan"),
            positions=self.positions,
            steps=self.steps,
            steps_total=self.steps_total,
            events_applied=self.events_applied,
            seconds=time.perf_counter() - self.version_started,
            cpu_seconds=time.process_time() - self.cpu_started,
            loss_by_behaviour={k: float(np.mean(v)) for k, v in self.by_behaviour.items()},
            checkpoint_path=checkpoint,
        ))
        self.version += 1
        self._reset_version_stats()

    def publish_due(self) -> bool:
        if self.steps == 0:
            return False
        return (self.steps >= self.plan.publish_every_steps
                or time.perf_counter() - self.version_started >= self.plan.publish_every_s)

    def pause_after(self, wall_s: float, cpu_s: float) -> float:
        """Seconds to rest after a step of `wall_s` wall and `cpu_s` CPU time so that CPU per
        wall second stays within the share, and steps per second within the cap."""
        rest = 0.0
        if self.plan.cpu_share > 0:
            rest = cpu_s / self.plan.cpu_share - wall_s
        if self.plan.max_steps_per_s > 0:
            rest = max(rest, 1.0 / self.plan.max_steps_per_s - wall_s)
        return max(0.0, rest)


def _reader(conn: Connection, inbox: queue.Queue) -> None:
    """Move messages from the pipe to the inbox; None when the pipe closes (parent gone)."""
    while True:
        try:
            inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(None)
            return


def worker_main(conn: Connection, niceness: int, parent_pid: int) -> None:
    """Entry point of the child process (see the module docstring). Runs `niceness` steps nicer
    than the service, so training takes the CPU serving leaves (freshness first)."""
    os.nice(niceness)
    try:
        message = conn.recv()
    except EOFError:
        return
    try:
        loop = _TrainerLoop(conn, message, parent_pid)
        conn.send(Ready(len(loop.trainer.items), _weights(loop.trainer)))
    except Exception:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(WorkerError(traceback.format_exc()))
        return
    inbox: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(conn, inbox), name="casm-trainer-inbox", daemon=True).start()
    deterministic = loop.plan.mode == "deterministic"
    rest_until = 0.0
    while True:
        # Wait for a message while resting (or idle), but never past the next step's time.
        can_train = not deterministic and len(loop.buffer) > 0
        wait = max(0.0, rest_until - time.perf_counter()) if can_train else _IDLE_WAIT_S
        try:
            message = inbox.get(timeout=wait) if wait > 0 else inbox.get_nowait()
        except queue.Empty:
            message = ...
        if message is None or not loop.parent_alive():
            return  # the parent is gone: no checkpoint, no more work
        try:
            if isinstance(message, Stop):
                if loop.steps:
                    loop.publish()
                conn.send(Stopped())
                return
            if isinstance(message, TrainingFeed):
                loop.apply_feed(message)
                if deterministic:
                    if message.steps and loop.steps == 0:  # time the round's training, not the wait before it
                        loop.version_started, loop.cpu_started = time.perf_counter(), time.process_time()
                    for _ in range(message.steps or 0):
                        if not loop.train_step():
                            break
                    if loop.similarity_due:
                        loop.measure_similarity()
                    if loop.steps:
                        loop.publish()
                    elif message.steps:  # nothing to train on yet: say so, the service waits for an answer
                        conn.send(NothingTrained(message.events_applied))
                continue
            if message is not ...:
                conn.send(WorkerError(f"unknown message {type(message).__name__}"))
                continue
            if not can_train or time.perf_counter() < rest_until:
                continue
            started, cpu = time.perf_counter(), time.process_time()
            trained = loop.train_step()
            if loop.similarity_due:
                loop.measure_similarity()
            if loop.publish_due():
                loop.publish()
            if trained:
                now = time.perf_counter()
                rest_until = now + loop.pause_after(now - started, time.process_time() - cpu)
            else:
                rest_until = time.perf_counter() + _IDLE_WAIT_S
        except SystemExit:
            return
        except Exception:  # noqa: BLE001 - one failed step must not kill the trainer
            try:
                conn.send(WorkerError(traceback.format_exc()))
            except (BrokenPipeError, OSError):
                return
            rest_until = time.perf_counter() + _IDLE_WAIT_S


Reply = TrainedVersion | Similarity | WorkerError | NothingTrained


class TrainingWorker:
    """Parent-side handle of the trainer process. Never blocks the caller unless asked to: the
    process starts in the background (`poll_ready`), `feed` hands data to a sender thread (a feed
    of several MB takes a while through the pipe), `poll` returns what the trainer sent since."""

    def __init__(self, niceness: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=worker_main, args=(child, niceness, os.getpid()),
                                        name="casm-trainer", daemon=True)
        self._process.start()
        child.close()
        self._outbox: queue.Queue = queue.Queue(maxsize=OUTBOX_FEEDS)
        self._send_error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name="casm-trainer-outbox", daemon=True)
        self._sender.start()
        self.initialized = False
        self.ready = False
        self.initial_num_items = 0
        self.initial_weights: dict[str, np.ndarray] = {}

    def _send_loop(self) -> None:
        """Send queued messages in order; stops at None or when the pipe breaks."""
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self._conn.send(message)
            except (OSError, EOFError, ValueError) as exc:  # ValueError: the connection was closed
                self._send_error = exc
                return

    def _enqueue(self, message: Any) -> None:
        if self._send_error is not None or not self._process.is_alive():
            raise RuntimeError(f"the trainer process is gone (exit code {self._process.exitcode}, "
                               f"last send error {self._send_error!r})")
        self._outbox.put(message)

    def initialize(self, init: WorkerInit) -> None:
        """Tell the process how to build its trainer (once)."""
        if self.initialized:
            raise RuntimeError("the trainer process is initialized already")
        self._enqueue(init)
        self.initialized = True

    def poll_ready(self, timeout_s: float = 0.0) -> bool:
        """True once the process has built its trainer (its initial weights are then in
        `initial_weights`); never blocks longer than `timeout_s`. Raises RuntimeError when the
        process failed to start."""
        if self.ready:
            return True
        if not self._conn.poll(timeout_s):
            if not self._process.is_alive():
                raise RuntimeError(f"trainer process exited with code {self._process.exitcode}")
            return False
        try:
            reply = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"trainer process exited with code {self._process.exitcode}") from None
        if not isinstance(reply, Ready):
            raise RuntimeError(f"trainer process failed to start:\n{getattr(reply, 'message', reply)}")
        self.initial_num_items, self.initial_weights = reply.num_items, reply.weights
        self.ready = True
        return True

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The trainer process's id (None before it started), e.g. to signal it."""
        return self._process.pid

    def feed(self, feed: TrainingFeed) -> None:
        """Queue `feed` for the trainer (in order). Raises RuntimeError when the process is not
        ready or gone."""
        if not self.ready:
            raise RuntimeError("the trainer process is not ready yet")
        self._enqueue(feed)

    def poll(self, timeout_s: float = 0.0) -> list[Reply]:
        """What the trainer sent (waiting up to `timeout_s` for the first message). Raises
        RuntimeError when the process is gone."""
        replies: list[Reply] = []
        wait = timeout_s
        while self._conn.poll(wait):
            try:
                replies.append(self._conn.recv())
            except EOFError:
                break
            wait = 0.0
        if not replies and not self._process.is_alive():
            raise RuntimeError(f"trainer process exited with code {self._process.exitcode}")
        return replies

    def wait_version(self, timeout_s: float) -> list[Reply]:
        """Block up to `timeout_s` until the answer to a deterministic feed (a TrainedVersion,
        NothingTrained or an error) arrives; returns every message up to it."""
        deadline = time.monotonic() + timeout_s
        replies: list[Reply] = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("no answer from the trainer within %.0f s: the round goes on without its version", timeout_s)
                return replies
            replies += self.poll(min(left, 1.0))
            if any(isinstance(r, TrainedVersion | WorkerError | NothingTrained) for r in replies):
                return replies

    def close(self, timeout_s: float) -> list[Reply]:
        """Stop the process: it publishes what it trained since its last version (returned with
        anything else it sent), then exits; terminated when it does not in time."""
        replies: list[Reply] = []
        try:
            if self._process.is_alive() and self.ready and self._send_error is None:
                self._outbox.put(Stop(), timeout=timeout_s)  # after the feeds queued before it
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and self._conn.poll(max(0.0, deadline - time.monotonic())):
                    reply = self._conn.recv()
                    if isinstance(reply, Stopped):
                        break
                    replies.append(reply)
        except (BrokenPipeError, EOFError, OSError, queue.Full):
            pass
        if not self.ready:  # nothing to collect: the closed pipe tells the child to go
            self._conn.close()
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout_s)
        try:
            self._outbox.put_nowait(None)  # ends the sender thread
        except queue.Full:
            pass
        self._conn.close()
        return replies


def deterministic_steps(events: int, steps_per_1000_events: float, carried: float) -> tuple[int, float]:
    """Whole steps for `events` new events at `steps_per_1000_events`, carrying the fraction:
    returns (steps, the fraction carried to the next round)."""
    exact = events * steps_per_1000_events / 1000.0 + carried
    steps = int(math.floor(exact + 1e-9))
    return steps, exact - steps
