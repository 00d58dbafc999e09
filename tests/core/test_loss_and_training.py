"""Weighted BCE by hand, alpha's effect on gradients, vocabulary growth in training, fine-tuning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from casm_core.config import BehaviourConfig, ModelConfig, TrainConfig
from casm_core.loss import weighted_bce
from casm_core.sampling import SequenceCorpus, TrainingBatch
from casm_core.trainer import Trainer, learning_rate_factor

BEHAVIOURS = BehaviourConfig(names=["pv", "cart", "buy"], target="buy", alpha={"pv": 0.25, "cart": 0.5, "buy": 1.0})


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_weighted_bce_equals_hand_computation() -> None:
    pos = torch.tensor([[0.5, -1.0, 2.0]])
    neg = torch.tensor([[[0.1, -0.3], [1.5, 0.0], [0.2, 0.2]]])
    weight = torch.tensor([[0.2, 1.0, 0.7]])
    has_target = torch.tensor([[True, True, False]])
    expected_terms = []
    for t in range(2):
        term = -weight[0, t].item() * math.log(sigmoid(pos[0, t].item()))
        term += sum(-math.log(1 - sigmoid(v)) for v in neg[0, t].tolist())
        expected_terms.append(term)
    result = weighted_bce(pos, neg, weight, has_target)
    assert result.loss.item() == pytest.approx(sum(expected_terms) / 2, rel=1e-6)
    assert result.per_position[0, 2].item() == 0.0
    assert result.per_position[0, :2].tolist() == pytest.approx(expected_terms, rel=1e-6)


def test_weighted_bce_is_stable_for_large_logits() -> None:
    result = weighted_bce(
        torch.tensor([[-200.0]]), torch.tensor([[[200.0]]]), torch.tensor([[1.0]]), torch.tensor([[True]])
    )
    assert result.loss.item() == pytest.approx(400.0)


def make_trainer(**train) -> Trainer:
    cfg = ModelConfig(hidden_dim=16, context_dim=8, num_heads=1, ffn_dim=16, max_len=6, dropout=0.0)
    return Trainer(cfg, TrainConfig(seed=3, batch_size=4, **train), BEHAVIOURS, item_ids=[f"i{i}" for i in range(20)])


def fixed_batch() -> TrainingBatch:
    # One sequence whose only target position predicts item 5 with behaviour `cart` (index 2).
    return TrainingBatch(
        input_items=np.array([[0, 0, 0, 0, 3, 4]]),
        input_behaviours=np.array([[0, 0, 0, 0, 1, 1]]),
        target_items=np.array([[0, 0, 0, 0, 0, 5]]),
        target_behaviours=np.array([[0, 0, 0, 0, 0, 2]]),
        negatives=np.array([[[9]] * 6]),
    )


def item_gradients(trainer: Trainer, alpha_cart: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients on the positive (5) and the negative (9) item embedding rows after one loss
    evaluation, weights left unchanged."""
    trainer.set_alpha({"cart": alpha_cart})
    trainer.model.zero_grad()
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    optimizer_step = trainer.optimizer.step
    trainer.optimizer.step = lambda: None  # keep the weights, look at the gradient only
    try:
        trainer.step(fixed_batch())
    finally:
        trainer.optimizer.step = optimizer_step
    trainer.model.load_state_dict(state)
    grad = trainer.model.item_embedding.weight.grad
    return grad[5].clone(), grad[9].clone()


def test_alpha_scales_the_positive_gradient() -> None:
    trainer = make_trainer(grad_clip=0.0)
    positive1, negative1 = item_gradients(trainer, 1.0)
    positive3, negative3 = item_gradients(trainer, 3.0)
    positive0, _ = item_gradients(trainer, 0.0)
    assert torch.linalg.norm(positive1) > 0
    torch.testing.assert_close(positive3, 3.0 * positive1)
    assert torch.count_nonzero(positive0) == 0
    # Negatives weigh 1 whatever alpha is.
    torch.testing.assert_close(negative3, negative1)


def test_set_alpha_validates_and_reports_old_values() -> None:
    trainer = make_trainer()
    old = trainer.set_alpha({"pv": 0.9})
    assert old["pv"] == 0.25 and trainer.alpha["pv"] == 0.9
    with pytest.raises(ValueError, match="unknown"):
        trainer.set_alpha({"click": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        trainer.set_alpha({"pv": -1.0})


def sequences(num_users: int, length: int, num_items: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, num_items + 1, (num_users, length)), rng.integers(1, 4, (num_users, length))


def test_fine_tune_reduces_loss_and_reports_per_behaviour() -> None:
    trainer = make_trainer(learning_rate=5e-3)
    items, behaviours = sequences(8, 7, 20, seed=1)
    first = trainer.fine_tune(items, behaviours, steps=1)
    for _ in range(60):
        last = trainer.fine_tune(items, behaviours, steps=1)
    assert last.loss < first.loss
    assert set(last.loss_by_behaviour) <= {"pv", "cart", "buy"} and last.positions > 0


def test_new_items_grow_the_model_and_keep_old_rows_and_optimizer_state() -> None:
    trainer = make_trainer(window="last")
    items, behaviours = sequences(8, 7, 20, seed=2)
    trainer.fine_tune(items, behaviours, steps=2)
    old_rows = trainer.model.item_embedding.weight.detach().clone()
    old_state = trainer.optimizer.state[trainer.model.item_embedding.weight]["exp_avg"].clone()
    with pytest.raises(ValueError, match="vocabulary"):
        trainer.fine_tune(items + 5, behaviours)
    codes = trainer.add_items(["i3", "new-a", "new-b"])
    assert codes.tolist() == [4, 21, 22]
    weight = trainer.model.item_embedding.weight
    assert weight.shape[0] == 23
    torch.testing.assert_close(weight[:21].detach(), old_rows)
    state = trainer.optimizer.state[weight]
    torch.testing.assert_close(state["exp_avg"][:21], old_state)
    assert torch.count_nonzero(state["exp_avg"][21:]) == 0
    assert any(p is weight for p in trainer.optimizer.param_groups[0]["params"])
    items[:, -1] = 22  # the new item is every row's newest event, so it is a positive
    new_row = weight[22].detach().clone()
    stats = trainer.fine_tune(items, behaviours, steps=1)
    assert math.isfinite(stats.loss)
    assert not torch.allclose(trainer.model.item_embedding.weight[22].detach(), new_row)


def test_training_is_seeded() -> None:
    items, behaviours = sequences(8, 7, 20, seed=4)
    losses = []
    for _ in range(2):
        trainer = make_trainer()
        losses.append([trainer.fine_tune(items, behaviours).loss for _ in range(5)])
    assert losses[0] == losses[1]


def test_fit_stops_early_and_restores_the_best_step() -> None:
    trainer = make_trainer(max_steps=50, patience_steps=2, validate_every_steps=1)
    items, behaviours = sequences(16, 7, 20, seed=5)
    corpus = SequenceCorpus.from_padded(items, behaviours)
    scores = iter([0.1, 0.5, 0.4, 0.3, 0.2, 0.1] + [0.0] * 50)
    snapshots = {}

    def validate(model) -> dict[str, float]:
        value = next(scores)
        snapshots[value] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"sampled.ndcg@10": value}

    report = trainer.fit(corpus, validate, progress=False)
    assert report.best_step == 2 and report.steps == 4 and report.stopped_early
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, snapshots[0.5][key])


def test_reindex_items_moves_known_rows_to_the_new_order() -> None:
    trainer = make_trainer()
    items, behaviours = sequences(8, 7, 20, seed=6)
    trainer.fine_tune(items, behaviours, steps=2)
    before = {name: trainer.model.item_embedding.weight[code].detach().clone()
              for name, code in zip(["i0", "i7", "i19"], [1, 8, 20], strict=True)}
    known = trainer.reindex_items(["new", "i19", "i0", "i7"])
    assert known == 3 and trainer.items.ids() == ["new", "i19", "i0", "i7"]
    weight = trainer.model.item_embedding.weight
    assert weight.shape[0] == 5
    torch.testing.assert_close(weight[2].detach(), before["i19"])
    torch.testing.assert_close(weight[3].detach(), before["i0"])
    torch.testing.assert_close(weight[4].detach(), before["i7"])
    assert torch.count_nonzero(weight[0]) == 0
    stats = trainer.fine_tune(np.array([[1, 2, 3, 4]]), np.array([[1, 2, 3, 1]]))
    assert math.isfinite(stats.loss)


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    factors = [learning_rate_factor(cfg, step) for step in range(111)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    constant = cfg.model_copy(update={"lr_schedule": "constant"})
    assert learning_rate_factor(constant, 100) == 1.0


def test_fit_counts_steps_and_restores_the_base_rate_for_fine_tuning() -> None:
    for sampling in ("users", "events"):
        trainer = make_trainer(max_steps=7, validate_every_steps=3, warmup_steps=2, sampling=sampling)
        items, behaviours = sequences(16, 7, 20, seed=7)
        report = trainer.fit(SequenceCorpus.from_padded(items, behaviours), lambda m: {"sampled.ndcg@10": 0.0}, progress=False)
        assert report.steps == trainer.steps == 7 and [r["step"] for r in report.history] == [3, 6, 7]
        assert trainer.optimizer.param_groups[0]["lr"] == trainer.train_cfg.learning_rate


def test_options_train_and_grow_with_new_items_and_behaviours() -> None:
    cfg = ModelConfig(hidden_dim=16, context_dim=16, ffn_dim=16, max_len=6, dropout=0.1,
                      target_conditioning="film", repeat_score=True, behaviour_attention=True)
    trainer = Trainer(cfg, TrainConfig(seed=0, batch_size=4, window_negatives=2, next_behaviour_weight=0.5),
                      BEHAVIOURS, item_ids=[f"i{i}" for i in range(20)])
    items, behaviours = sequences(8, 7, 20, seed=8)
    assert math.isfinite(trainer.fine_tune(items, behaviours, steps=3).loss)
    trainer.add_behaviours(["fav"])
    trainer.add_items(["new"])
    phi = trainer.model.repeat_weight.weight
    assert phi.shape == (5, 5 * cfg.repeat_age_buckets)
    stats = trainer.fine_tune(np.array([[21, 1, 2, 21]]), np.array([[4, 1, 2, 4]]), steps=2)
    assert math.isfinite(stats.loss) and "fav" in stats.loss_by_behaviour


def test_sampling_correction_puts_window_items_on_the_uniform_negatives_scale() -> None:
    trainer = make_trainer(num_negatives=1, window_negatives=1)  # 20 items
    items = torch.tensor([[0, 3, 5, 3, 7]])
    # Candidates per position: positive, one sampled, one window negative.
    candidates = torch.tensor([[[0, 0, 0], [5, 9, 3], [3, 9, 5], [7, 9, 3], [3, 9, 5]]])
    correction = trainer._sampling_correction(items, candidates, num_items=20)
    # At position 3 (window 3, 5, 3: |w| = 3) item 3 occurs twice: rate 1 * 2 / 3 against 1 / 20.
    assert correction[0, 3, 2].item() == pytest.approx(math.log(2 / 3 * 20))
    assert correction[0, 2, 0].item() == pytest.approx(math.log(1 / 2 * 20))  # positive 3 seen once of 2
    assert correction[0, 1, 0].item() == 0.0  # positive 5 is not in the window yet
    assert (correction[..., 1] == 0).all()  # sampled negatives are never window items


def test_gradient_similarity_is_a_cosine_per_behaviour_and_takes_no_step() -> None:
    cfg = ModelConfig(hidden_dim=16, context_dim=8, ffn_dim=16, max_len=8, dropout=0.0)
    trainer = Trainer(cfg, TrainConfig(batch_size=32, seed=0), BEHAVIOURS, item_ids=[f"i{k}" for k in range(30)])
    rng = np.random.default_rng(0)
    items = rng.integers(1, 31, (40, 9))
    behaviours = rng.choice([1, 2, 3], size=(40, 9), p=[0.6, 0.2, 0.2])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    similarity = trainer.gradient_similarity(items, behaviours)
    assert set(similarity) == {"pv", "cart", "buy"}
    assert similarity["buy"] == pytest.approx(1.0, abs=1e-5)
    assert all(-1.0 <= v <= 1.0 for v in similarity.values())
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    no_cart = np.where(behaviours == 2, 1, behaviours)
    assert "cart" not in trainer.gradient_similarity(items, no_cart)
    assert trainer.gradient_similarity(items, np.where(behaviours == 3, 1, behaviours)) == {}  # no target
