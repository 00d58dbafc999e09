"""Checkpoints that carry everything needed to resume: weights, optimizer state, the three
configs, the item vocabulary, the behaviour vocabulary with the current alpha, and metadata.
Written atomically: to a temporary file in the same folder, fsynced, then renamed over the
target, so a crash leaves either the old or the new checkpoint, never a torn one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from casm_core.config import BehaviourConfig, ModelConfig, TrainConfig
from casm_core.trainer import Trainer

CHECKPOINT_FORMAT = 1


def save_checkpoint(trainer: Trainer, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `trainer` to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": trainer.model_cfg.model_dump(),
        "train_config": trainer.train_cfg.model_dump(),
        "behaviours": trainer.behaviours.model_dump(),
        "item_ids": trainer.items.ids(),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "steps": trainer.steps,
        "metadata": dict(metadata or {}),
    }
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            torch.save(payload, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Trainer, dict[str, Any]]:
    """The trainer saved at `path` (on `device`) and the checkpoint's metadata."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {payload.get('format')!r}")
    trainer = Trainer(
        ModelConfig(**payload["model_config"]),
        TrainConfig(**payload["train_config"]),
        BehaviourConfig(**payload["behaviours"]),
        item_ids=payload["item_ids"],
        device=device,
    )
    trainer.model.load_state_dict(payload["model"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    trainer.steps = payload["steps"]
    return trainer, payload["metadata"]
