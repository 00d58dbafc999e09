"""The CASM network: causality, padding, candidate embedding, growth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from casm_core.config import ModelConfig
from casm_core.model import CASM

NUM_ITEMS, NUM_BEHAVIOURS = 30, 4


def make_model(**overrides) -> CASM:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=16, context_dim=8, num_heads=2, ffn_dim=32, max_len=12, dropout=0.0, **overrides)
    return CASM(cfg, NUM_ITEMS, NUM_BEHAVIOURS).eval()


def random_sequences(batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, NUM_ITEMS + 1, (batch, width), generator=g)
    behaviours = torch.randint(1, NUM_BEHAVIOURS + 1, (batch, width), generator=g)
    return items, behaviours


@pytest.mark.parametrize("use_context", [True, False])
def test_output_at_t_ignores_later_positions(use_context: bool) -> None:
    model = make_model(use_context=use_context)
    items, behaviours = random_sequences(3, 12, seed=1)
    before = model.encode(items, behaviours)
    t = 6
    changed_items, changed_behaviours = items.clone(), behaviours.clone()
    changed_items[:, t + 1 :] = torch.randint(1, NUM_ITEMS + 1, changed_items[:, t + 1 :].shape)
    changed_behaviours[:, t + 1 :] = torch.randint(1, NUM_BEHAVIOURS + 1, changed_behaviours[:, t + 1 :].shape)
    after = model.encode(changed_items, changed_behaviours)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1])
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


def test_output_depends_on_earlier_positions() -> None:
    model = make_model()
    items, behaviours = random_sequences(1, 12, seed=2)
    changed = items.clone()
    changed[0, 2] = (changed[0, 2] % NUM_ITEMS) + 1
    assert not torch.allclose(model.encode(changed, behaviours)[:, -1], model.encode(items, behaviours)[:, -1])


def test_left_padding_width_and_padding_content_do_not_matter() -> None:
    model = make_model()
    items, behaviours = random_sequences(1, 5, seed=3)
    narrow = model.user_representation(items, behaviours)
    pad = torch.zeros(1, 7, dtype=torch.int64)
    wide = model.user_representation(torch.cat([pad, items], 1), torch.cat([pad, behaviours], 1))
    torch.testing.assert_close(wide, narrow)
    # Garbage behaviours on padded positions (item 0) change nothing either.
    wide_garbage = model.user_representation(torch.cat([pad, items], 1), torch.cat([pad + 3, behaviours], 1))
    torch.testing.assert_close(wide_garbage, narrow)


def test_rows_of_a_batch_are_independent_and_padded_positions_are_zero() -> None:
    model = make_model()
    items, behaviours = random_sequences(2, 12, seed=4)
    items[1, :8] = 0
    behaviours[1, :8] = 0
    together = model.encode(items, behaviours)
    alone = model.encode(items[1:], behaviours[1:])
    torch.testing.assert_close(together[1:], alone)
    assert torch.count_nonzero(together[1, :8]) == 0
    assert torch.isfinite(together).all()


def test_width_beyond_max_len_is_refused() -> None:
    model = make_model()
    items, behaviours = random_sequences(1, 13, seed=5)
    with pytest.raises(ValueError, match="max_len"):
        model.encode(items, behaviours)


def test_candidate_matrix_embeds_items_with_the_given_context() -> None:
    model = make_model()
    matrix = model.candidate_matrix(behaviour=2)
    assert matrix.shape == (NUM_ITEMS + 1, 16)
    items = torch.tensor([3, 7])
    torch.testing.assert_close(matrix[items], model.embed(items, torch.tensor([2, 2])))
    assert not torch.allclose(model.candidate_matrix(behaviour=1)[items], matrix[items])


def test_sasrec_variant_has_no_context_table() -> None:
    model = make_model(use_context=False)
    assert model.context_embedding is None and model.fuse is None
    items = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model.embed(items, items * 0 + 1), model.embed(items, items * 0 + 4))


def test_grow_keeps_old_rows_and_adds_new_ones() -> None:
    model = make_model(repeat_score=False)  # the option tables' growth: test_loss_and_training
    items_before = model.item_embedding.weight.detach().clone()
    context_before = model.context_embedding.weight.detach().clone()
    replaced = model.grow(NUM_ITEMS + 5, NUM_BEHAVIOURS + 1)
    assert len(replaced) == 2
    assert model.num_items == NUM_ITEMS + 5 and model.num_behaviours == NUM_BEHAVIOURS + 1
    torch.testing.assert_close(model.item_embedding.weight[: NUM_ITEMS + 1], items_before)
    torch.testing.assert_close(model.context_embedding.weight[: NUM_BEHAVIOURS + 1], context_before)
    assert model.grow(NUM_ITEMS + 5, NUM_BEHAVIOURS + 1) == []
    # The grown model scores the new items.
    seq = torch.tensor([[1, NUM_ITEMS + 4]])
    assert torch.isfinite(model.user_representation(seq, torch.tensor([[1, NUM_BEHAVIOURS + 1]]))).all()


def _trained_on_behaviour_split(conditioning: str):
    """A small model trained where the next item depends on the next behaviour: pv events are
    of items 1-10, buy events of items 11-20, in random order."""
    from casm_core.config import BehaviourConfig, TrainConfig
    from casm_core.trainer import Trainer

    rng = np.random.default_rng(0)
    behaviours = rng.integers(1, 3, (64, 9))  # 1 = pv, 2 = buy
    items = np.where(behaviours == 1, rng.integers(1, 11, behaviours.shape), rng.integers(11, 21, behaviours.shape))
    cfg = ModelConfig(hidden_dim=16, context_dim=8, ffn_dim=16, max_len=8, dropout=0.0,
                      target_conditioning=conditioning, repeat_score=False)
    trainer = Trainer(cfg, TrainConfig(seed=0, batch_size=32, learning_rate=1e-2, num_negatives=4, window_negatives=0),
                      BehaviourConfig(names=["pv", "buy"], target="buy", alpha={}), item_ids=[str(i) for i in range(20)])
    trainer.fine_tune(items, behaviours, steps=150)
    return trainer.model, items[:8, 1:], behaviours[:8, 1:]


def test_the_target_behaviour_changes_a_trained_models_ranking_only_with_conditioning() -> None:
    from casm_core.scoring import Scorer

    model, items, behaviours = _trained_on_behaviour_split("film")
    _, for_pv = Scorer(model, 1).top_k(items, behaviours, k=5)
    _, for_buy = Scorer(model, 2).top_k(items, behaviours, k=5)
    assert (for_pv <= 10).mean() > 0.9 and (for_buy > 10).mean() > 0.9
    # Without conditioning the context is a constant per query: the ranking cannot change.
    plain, items, behaviours = _trained_on_behaviour_split("none")
    torch.testing.assert_close(
        torch.as_tensor(Scorer(plain, 1).top_k(items, behaviours, k=20)[1]),
        torch.as_tensor(Scorer(plain, 2).top_k(items, behaviours, k=20)[1]),
    )


def _with_random_options(**options) -> CASM:
    """A model whose option tables hold random values (they start at 0, a no-op)."""
    model = make_model(**options)
    torch.manual_seed(3)
    with torch.no_grad():
        for table in (model.target_scale, model.target_shift, model.repeat_weight, model.repeat_gate, model.repeat_gate_bias, model.repeat_base_scale):
            if table is not None:
                table.weight.normal_(std=0.5)
    return model


OPTION_SETS = [
    {"target_conditioning": "film"},
    {"repeat_score": True},
    {"behaviour_attention": True},
    {"target_conditioning": "film", "repeat_score": True, "behaviour_attention": True},
]


@pytest.mark.parametrize("options", OPTION_SETS)
def test_candidate_logits_at_t_ignore_later_events(options: dict) -> None:
    model = _with_random_options(**options)
    items, behaviours = random_sequences(3, 12, seed=5)
    items[:, :3] = 0
    behaviours[:, :3] = 0
    candidates = torch.cat([items, torch.randint(1, NUM_ITEMS + 1, items.shape)], dim=1)[:, None, :].expand(-1, 12, -1)
    target = torch.full(items.shape, 2)

    def logits(its: torch.Tensor, bes: torch.Tensor) -> torch.Tensor:
        return model.candidate_logits(model.encode(its, bes), its, bes, candidates, target)

    before = logits(items, behaviours)
    t = 7
    later_items, later_behaviours = items.clone(), behaviours.clone()
    later_items[:, t + 1 :] = items[:, 3:4]  # repeat an earlier item after t
    later_behaviours[:, t + 1 :] = 1 + behaviours[:, t + 1 :] % NUM_BEHAVIOURS
    after = logits(later_items, later_behaviours)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1])
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :])


@pytest.mark.parametrize("options", [{}, *OPTION_SETS])
def test_full_ranking_and_candidate_scores_agree(options: dict) -> None:
    from casm_core.scoring import Scorer

    scorer = Scorer(_with_random_options(**options), target_behaviour=3)
    items, behaviours = random_sequences(4, 10, seed=6)
    items[0, :4] = 0
    behaviours[0, :4] = 0
    candidates = torch.cat([items[:, -3:], torch.randint(1, NUM_ITEMS + 1, (4, 5))], dim=1)
    full = scorer.score_all(items, behaviours)
    torch.testing.assert_close(scorer.score_candidates(items.numpy(), behaviours.numpy(), candidates.numpy()),
                               full.gather(1, candidates), rtol=1e-5, atol=1e-5)


def test_repeat_score_touches_only_window_items() -> None:
    from casm_core.scoring import Scorer

    items, behaviours = random_sequences(2, 10, seed=7)
    plain = make_model(repeat_score=True)  # phi and gate at 0: the plain score
    repeat = _with_random_options(repeat_score=True)
    repeat.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("repeat")}, strict=False)
    delta = Scorer(repeat, 2).score_all(items, behaviours) - Scorer(plain, 2).score_all(items, behaviours)
    in_window = torch.zeros_like(delta, dtype=torch.bool).scatter_(1, items, True)
    assert torch.all(delta[:, 1:][~in_window[:, 1:]] == 0) and torch.all(delta[in_window] != 0)


@pytest.mark.parametrize("options", [{"num_blocks": 1}, {"num_blocks": 3}, {"behaviour_attention": True}, {"use_context": False}])
def test_the_last_position_shortcut_of_inference_equals_the_full_encoding(options: dict) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_dim=16, context_dim=8, num_heads=2, ffn_dim=32, max_len=12, dropout=0.2, **options)
    model = CASM(cfg, NUM_ITEMS, NUM_BEHAVIOURS).eval()
    items, behaviours = random_sequences(5, 12, seed=9)
    items[1, :7] = 0
    behaviours[1, :7] = 0
    items[2], behaviours[2] = 0, 0  # no history at all
    full = model.encode(items, behaviours)[:, -1, :]
    torch.testing.assert_close(model.user_representation(items, behaviours), full, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(model.user_representation(items, behaviours)[2]) == 0
