"""The trainer role: a child process that owns the trainable model and its optimizer, fine-tunes
on samples the service sends, writes checkpoints, and returns new weights as model versions.

Why a process and not a thread: fine-tuning is many small torch ops with Python between them; in
a thread it would hold the GIL often enough to delay ingestion and refresh (freshness p99). In its
own process it competes for CPU only, the serving loop never waits for it, and the same protocol
is the seed of a separate trainer that distributes model versions to several `casm serve`
instances later.

Protocol (over a `multiprocessing` pipe, plain picklable values only):
    -> ("init", WorkerInit)         <- ("ready", num_items, weights) or ("error", message)
    -> ("fine_tune", FineTuneJob)   <- ("trained", TrainedVersion) or ("error", message)
       (the job names a checkpoint path: the worker writes it atomically before answering)
    -> ("stop",)                    <- ("stopped",)
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class WorkerInit:
    """How the worker builds its trainer: from a checkpoint or from configs (plain dicts)."""

    model_config: dict[str, Any]
    train_config: dict[str, Any]
    behaviours: dict[str, Any]
    item_ids: list[str]
    device: str
    threads: int
    checkpoint: str | None = None


@dataclass
class FineTuneJob:
    """One fine-tuning round: sequences [n, N] (left-padded indices of the store's vocabulary),
    the store's item ids added since the last job, the alpha to train with, and step count."""

    version: int
    items: np.ndarray
    behaviours: np.ndarray
    new_item_ids: list[str]
    behaviour_names: list[str]
    alpha: dict[str, float]
    steps: int
    checkpoint_path: str | None = None


@dataclass
class TrainedVersion:
    """Weights after a job (numpy arrays by state-dict key) and what training saw."""

    version: int
    weights: dict[str, np.ndarray]
    num_items: int
    behaviour_names: list[str]
    loss: float
    positions: int
    loss_by_behaviour: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    checkpoint_path: str | None = None


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


def worker_main(conn: Connection, niceness: int) -> None:
    """Entry point of the child process: import torch while the parent starts up, then build the
    trainer from the WorkerInit it sends. Runs `niceness` steps nicer than the service, so
    training takes the CPU serving leaves (freshness first)."""
    import os

    os.nice(niceness)
    from casm_core.checkpoint import save_checkpoint

    try:
        message = conn.recv()
    except EOFError:
        return
    try:
        trainer = _build_trainer(message[1])
        conn.send(("ready", len(trainer.items), _weights(trainer)))
    except Exception:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        kind = message[0]
        try:
            if kind == "stop":
                conn.send(("stopped",))
                return
            if kind == "fine_tune":
                job: FineTuneJob = message[1]
                started = time.perf_counter()
                trainer.add_items(job.new_item_ids)
                trainer.add_behaviours(job.behaviour_names)
                trainer.set_alpha(job.alpha)
                stats = trainer.fine_tune(job.items, job.behaviours, steps=job.steps)
                seconds = time.perf_counter() - started
                checkpoint = None
                if job.checkpoint_path:  # written here so the serving loop never waits for the disk
                    checkpoint = str(save_checkpoint(trainer, job.checkpoint_path, {"version": job.version}))
                conn.send((
                    "trained",
                    TrainedVersion(
                        version=job.version,
                        weights=_weights(trainer),
                        num_items=len(trainer.items),
                        behaviour_names=list(trainer.behaviours.names),
                        loss=stats.loss,
                        positions=stats.positions,
                        loss_by_behaviour=stats.loss_by_behaviour,
                        seconds=seconds,
                        checkpoint_path=checkpoint,
                    ),
                ))
            else:
                conn.send(("error", f"unknown message {kind!r}"))
        except Exception:  # noqa: BLE001 - one failed job must not kill the trainer
            conn.send(("error", traceback.format_exc()))


class TrainingWorker:
    """Parent-side handle of the trainer process. Never blocks the caller: the process starts in
    the background (`poll_ready`), `submit` sends a job, `poll` returns a finished one; at most
    one job is in flight."""

    def __init__(self, niceness: int = 0) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=worker_main, args=(child, niceness), name="casm-trainer", daemon=True)
        self._process.start()
        child.close()
        self.initialized = False
        self.ready = False
        self.busy = False
        self.initial_num_items = 0
        self.initial_weights: dict[str, np.ndarray] = {}

    def initialize(self, init: WorkerInit) -> None:
        """Tell the process how to build its trainer (once)."""
        if self.initialized:
            raise RuntimeError("the trainer process is initialized already")
        self._conn.send(("init", init))
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
        if reply[0] != "ready":
            raise RuntimeError(f"trainer process failed to start:\n{reply[1]}")
        self.initial_num_items, self.initial_weights = reply[1], reply[2]
        self.ready = True
        return True

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def submit(self, job: FineTuneJob) -> None:
        if not self.ready:
            raise RuntimeError("the trainer process is not ready yet")
        if self.busy:
            raise RuntimeError("a fine-tuning job is already in flight")
        self._conn.send(("fine_tune", job))
        self.busy = True

    def poll(self) -> TrainedVersion | None:
        """The finished job's result, if one is ready (never blocks). Raises RuntimeError when the
        job failed."""
        if not self.busy or not self._conn.poll():
            return None
        try:
            reply = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"trainer process exited with code {self._process.exitcode}") from None
        self.busy = False
        if reply[0] == "trained":
            return reply[1]
        raise RuntimeError(f"fine-tuning failed in the trainer process:\n{reply[1]}")

    def wait(self, timeout_s: float) -> TrainedVersion | None:
        """Block up to `timeout_s` for the job in flight."""
        if self.busy and self._conn.poll(timeout_s):
            return self.poll()
        return None

    def close(self, timeout_s: float) -> None:
        """Stop the process: politely, then terminate."""
        try:
            if self._process.is_alive() and not self.busy:
                self._conn.send(("stop",))
                self._conn.poll(timeout_s)
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout_s)
        self._conn.close()
