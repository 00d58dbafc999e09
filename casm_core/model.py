"""The CASM network (Context-Aware Sequential Model, arXiv 2312.09684).

An event is (item, behaviour). Its input embedding is ``fuse([E_item[i] ; E_ctx[b]])`` (a linear
layer over the concatenation) plus a learned positional embedding; a stack of pre-norm blocks of
**causal** multi-head self-attention and a point-wise feed-forward layer (residual connections,
layer norm, dropout) turns a sequence into one representation per position. A candidate item is
embedded the same way with a behaviour as its context (the target behaviour when recommending)
and scored by the dot product with the representation of the last position.

Shapes: sequences are int64 ``[B, W]``, left-padded with 0 (the newest event in the last column),
``W <= max_len``. Positions are counted from the right, so the same events give the same output
whatever the padded width of the batch. With ``use_context=False`` the model is SASRec: item
embeddings only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from casm_core.config import ModelConfig


class SelfAttentionBlock(nn.Module):
    """Pre-norm block: x + MHA(LN(x)), then x + FFN(LN(x)); padded positions zeroed after each."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.attention_norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attention_out = nn.Linear(d, d)
        self.attention_dropout = nn.Dropout(cfg.dropout)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(
            nn.Linear(d, cfg.ffn_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, d),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: [B, W, d]; attend: bool [B, 1, W, W] (query row may attend key column);
        keep: float [B, W, 1] (1 for real events, 0 for padding)."""
        batch, width, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, width, self.num_heads, dim // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v),
            attn_mask=attend,
            dropout_p=self.dropout if self.training else 0.0,
        )
        attended = attended.transpose(1, 2).reshape(batch, width, dim)
        x = (x + self.attention_dropout(self.attention_out(attended))) * keep
        return (x + self.ffn(self.ffn_norm(x))) * keep


class CASM(nn.Module):
    """CASM over `num_items` items and `num_behaviours` behaviours (padding index 0 not counted)."""

    def __init__(self, cfg: ModelConfig, num_items: int, num_behaviours: int) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.item_embedding = nn.Embedding(num_items + 1, d, padding_idx=0)
        if cfg.use_context:
            self.context_embedding = nn.Embedding(num_behaviours + 1, cfg.context_dim, padding_idx=0)
            self.fuse = nn.Linear(d + cfg.context_dim, d)
        else:
            self.context_embedding = None
            self.fuse = None
        self.position_embedding = nn.Embedding(cfg.max_len, d)
        self.embedding_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(d)
        self._init_weights()

    def _init_weights(self) -> None:
        tables = [self.item_embedding, self.position_embedding]
        if self.context_embedding is not None:
            tables.append(self.context_embedding)
        for table in tables:
            nn.init.normal_(table.weight, std=self.cfg.init_std)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()
        if self.fuse is not None:
            # The fusion starts as "item embedding plus a small context term": identity on the item
            # half, Xavier-scaled on the context half, no bias. The network then starts where
            # SASRec starts (input and candidate embeddings of an item coincide, which lets it learn
            # "the item you just saw" quickly) and learns how context shifts it. With a Xavier item
            # half it learned markedly slower on sparse logs (taobao_users, see EVALUATION.md).
            nn.init.xavier_normal_(self.fuse.weight)
            with torch.no_grad():
                self.fuse.weight[:, : self.cfg.hidden_dim].copy_(torch.eye(self.cfg.hidden_dim))
            nn.init.zeros_(self.fuse.bias)

    @property
    def num_items(self) -> int:
        return self.item_embedding.num_embeddings - 1

    @property
    def num_behaviours(self) -> int:
        return 0 if self.context_embedding is None else self.context_embedding.num_embeddings - 1

    def embed(self, items: torch.Tensor, behaviours: torch.Tensor) -> torch.Tensor:
        """Fused event embeddings, [..., d], for int64 items and behaviours of the same shape."""
        embedded = self.item_embedding(items)
        if self.fuse is None:
            return embedded
        return self.fuse(torch.cat([embedded, self.context_embedding(behaviours)], dim=-1))

    def encode(self, items: torch.Tensor, behaviours: torch.Tensor) -> torch.Tensor:
        """Causal representations [B, W, d] of left-padded sequences items/behaviours [B, W].
        Position t sees events 0..t only; padded positions come out as zeros."""
        width = items.shape[1]
        if width > self.cfg.max_len:
            raise ValueError(f"sequence width {width} exceeds max_len {self.cfg.max_len}")
        real = items != 0
        keep = real.unsqueeze(-1).to(self.item_embedding.weight.dtype)
        positions = torch.arange(self.cfg.max_len - width, self.cfg.max_len, device=items.device)
        x = self.embed(items, behaviours) + self.position_embedding(positions)
        x = self.embedding_dropout(x) * keep
        causal = torch.ones(width, width, dtype=torch.bool, device=items.device).tril()
        # A query may attend to real keys at or before it; every position also attends to itself
        # so that padded rows (all keys masked) do not produce NaNs. Their outputs are zeroed.
        self_loop = torch.eye(width, dtype=torch.bool, device=items.device)
        attend = causal & (real[:, None, None, :] | self_loop)  # [B, 1, W, W]
        for block in self.blocks:
            x = block(x, attend, keep)
        return self.final_norm(x) * keep

    def user_representation(self, items: torch.Tensor, behaviours: torch.Tensor) -> torch.Tensor:
        """Representation [B, d] of each sequence after its newest event (last column)."""
        return self.encode(items, behaviours)[:, -1, :]

    def candidate_matrix(self, behaviour: int) -> torch.Tensor:
        """Every item (row 0 = padding) embedded with context `behaviour`: [num_items + 1, d]."""
        items = torch.arange(self.item_embedding.num_embeddings, device=self.item_embedding.weight.device)
        return self.embed(items, torch.full_like(items, behaviour))

    def grow(self, num_items: int, num_behaviours: int | None = None) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Enlarge the item (and context) tables to hold `num_items` items (`num_behaviours`
        behaviours), keeping existing rows. Returns (old, new) parameter pairs so an optimizer
        can carry its state over; empty when nothing grew."""
        replaced = []
        pairs = [(self.item_embedding, num_items + 1)]
        if self.context_embedding is not None and num_behaviours is not None:
            pairs.append((self.context_embedding, num_behaviours + 1))
        for table, rows in pairs:
            old = table.weight
            if rows <= old.shape[0]:
                continue
            extra = torch.empty(rows - old.shape[0], old.shape[1], device=old.device, dtype=old.dtype)
            nn.init.normal_(extra, std=self.cfg.init_std)
            new = nn.Parameter(torch.cat([old.detach(), extra], dim=0))
            table.weight = new
            table.num_embeddings = rows
            replaced.append((old, new))
        return replaced
