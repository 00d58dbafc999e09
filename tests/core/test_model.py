"""The CASM network: causality, padding, candidate embedding, growth."""

from __future__ import annotations

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
    model = make_model()
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
