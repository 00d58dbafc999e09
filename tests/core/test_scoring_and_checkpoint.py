"""Top-K scoring with exclusions, and the checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casm_core.checkpoint import load_checkpoint, save_checkpoint
from casm_core.config import BehaviourConfig, ModelConfig, TrainConfig
from casm_core.scoring import Scorer, items_with_behaviours
from casm_core.trainer import Trainer

BEHAVIOURS = BehaviourConfig(names=["pv", "cart", "buy"], target="buy", alpha={"pv": 0.3})


def trained_trainer() -> Trainer:
    cfg = ModelConfig(hidden_dim=16, context_dim=8, ffn_dim=16, max_len=8, dropout=0.1)
    trainer = Trainer(cfg, TrainConfig(seed=1, batch_size=8), BEHAVIOURS, item_ids=[f"i{i}" for i in range(40)])
    rng = np.random.default_rng(0)
    trainer.fine_tune(rng.integers(1, 41, (16, 9)), rng.integers(1, 4, (16, 9)), steps=3)
    return trainer


def sequences() -> tuple[np.ndarray, np.ndarray]:
    items = np.array([[0, 0, 3, 5, 7], [1, 2, 3, 4, 5]])
    behaviours = np.array([[0, 0, 1, 3, 1], [1, 1, 2, 3, 3]])
    return items, behaviours


def test_top_k_matches_full_scores_and_honours_exclusions() -> None:
    scorer = Scorer(trained_trainer().model, BEHAVIOURS.target_index())
    items, behaviours = sequences()
    full = scorer.score_all(items, behaviours)
    assert full.shape == (2, 41) and torch.isinf(full[:, 0]).all()
    scores, best = scorer.top_k(items, behaviours, k=5)
    np.testing.assert_array_equal(best, torch.topk(full, 5).indices.numpy())
    assert (np.diff(scores, axis=1) <= 0).all()

    bought = items_with_behaviours(items, behaviours, [BEHAVIOURS.target_index()])
    assert bought.tolist() == [[0, 0, 0, 5, 0], [0, 0, 0, 4, 5]]
    forced = best[:, :2]  # exclude the current favourites: they must disappear
    _, without = scorer.top_k(items, behaviours, k=5, exclude=np.concatenate([bought, forced], axis=1))
    for row in range(2):
        assert not set(without[row]) & (set(bought[row]) | set(forced[row]))
        assert 0 not in without[row]


def test_checkpoint_round_trip_reproduces_scores_and_training(tmp_path) -> None:
    trainer = trained_trainer()
    trainer.set_alpha({"cart": 0.7})
    path = save_checkpoint(trainer, tmp_path / "models" / "casm.pt", {"version": 3})
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    restored, metadata = load_checkpoint(path)
    assert metadata == {"version": 3}
    assert restored.items.ids() == trainer.items.ids()
    assert restored.alpha == trainer.alpha and restored.alpha["cart"] == 0.7
    items, behaviours = sequences()
    target = BEHAVIOURS.target_index()
    torch.testing.assert_close(
        Scorer(restored.model, target).score_all(items, behaviours),
        Scorer(trainer.model, target).score_all(items, behaviours),
    )
    # Optimizer state travels too: one more identical step gives identical weights.
    batch_rng = np.random.default_rng(5)
    more_items, more_behaviours = batch_rng.integers(1, 41, (8, 9)), batch_rng.integers(1, 4, (8, 9))
    for t in (trainer, restored):
        t.rng = np.random.default_rng(9)
        torch.manual_seed(9)
        t.fine_tune(more_items, more_behaviours)
    torch.testing.assert_close(restored.model.state_dict(), trainer.model.state_dict())


def test_checkpoint_write_is_atomic_when_saving_fails(tmp_path, monkeypatch) -> None:
    trainer = trained_trainer()
    path = save_checkpoint(trainer, tmp_path / "casm.pt")
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(trainer, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["casm.pt"]


def test_items_newer_than_the_model_are_scored_by_their_repeat_term_alone() -> None:
    scorer = Scorer(trained_trainer().model, BEHAVIOURS.target_index())  # 40 items, repeat score on
    with torch.no_grad():
        scorer.model.repeat_gate_bias.weight.fill_(2.0)  # window items are worth repeating
    items = np.array([[0, 3, 42, 5, 41], [1, 2, 3, 4, 5]])
    behaviours = np.array([[0, 1, 1, 2, 1], [1, 1, 2, 3, 3]])
    wide = scorer.with_catalogue(43)
    scores = wide.score_all(items, behaviours)
    assert scores.shape == (2, 44) and scorer.score_all(items, behaviours).shape == (2, 41)
    assert torch.isfinite(scores[0, [41, 42]]).all() and torch.isinf(scores[0, 43])
    assert torch.isinf(scores[1, 41:]).all()  # not in that user's window
    # Known items score as before: the new items are padding to the encoder either way.
    clipped = np.where(items > 40, 0, items)
    torch.testing.assert_close(scores[:, :41], scorer.with_catalogue(43).score_all(clipped, behaviours)[:, :41])
    _, best = wide.top_k(items, behaviours, k=5)
    assert {41, 42} <= set(best[0].tolist())


def test_without_the_repeat_score_newer_items_cannot_be_recommended() -> None:
    cfg = ModelConfig(hidden_dim=16, context_dim=8, ffn_dim=16, max_len=8, repeat_score=False)
    trainer = Trainer(cfg, TrainConfig(seed=1, batch_size=8, window_negatives=0), BEHAVIOURS,
                      item_ids=[f"i{i}" for i in range(40)])
    scores = Scorer(trainer.model, 3).with_catalogue(42).score_all(np.array([[1, 41]]), np.array([[1, 1]]))
    assert scores.shape == (1, 43) and torch.isinf(scores[0, 41:]).all()
