"""CASM's weighted binary cross-entropy.

At every position t with a next event, the next event's item is the positive, weighted by
alpha of that event's behaviour; each sampled negative weighs 1:

    l_t = alpha_{b(t+1)} * -log(sigmoid(s+_t))  +  sum_j -log(1 - sigmoid(s-_{t,j}))

and the loss is the mean of l_t over the positions that have a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class WeightedBCE:
    """The loss of one batch: `loss` (scalar, differentiable), `per_position` [B, W] (detached;
    0 where there is no target) and the same still in the graph, `per_position_graph`."""

    loss: torch.Tensor
    per_position: torch.Tensor
    per_position_graph: torch.Tensor


def weighted_bce(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    positive_weight: torch.Tensor,
    has_target: torch.Tensor,
    negative_mask: torch.Tensor | None = None,
) -> WeightedBCE:
    """positive_logits [B, W]; negative_logits [B, W, K]; positive_weight [B, W] (alpha of the
    positive's behaviour); has_target bool [B, W]; negative_mask bool [B, W, K] (None: every
    negative counts)."""
    # -log(sigmoid(x)) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), without overflow.
    positive_term = F.softplus(-positive_logits) * positive_weight
    negative_loss = F.softplus(negative_logits)
    if negative_mask is not None:
        negative_loss = negative_loss * negative_mask.to(negative_loss.dtype)
    negative_term = negative_loss.sum(dim=-1)
    mask = has_target.to(positive_logits.dtype)
    per_position = (positive_term + negative_term) * mask
    loss = per_position.sum() / mask.sum().clamp(min=1.0)
    return WeightedBCE(loss=loss, per_position=per_position.detach(), per_position_graph=per_position)
