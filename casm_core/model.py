"""The CASM network (Context-Aware Sequential Model, arXiv 2312.09684).

An event is (item, behaviour). Its input embedding is ``fuse([E_item[i] ; E_ctx[b]])`` (a linear
layer over the concatenation) plus a learned positional embedding; a stack of pre-norm blocks of
**causal** multi-head self-attention and a point-wise feed-forward layer (residual connections,
layer norm, dropout) turns a sequence into one representation per position. A candidate item is
embedded the same way with a behaviour as its context (the target behaviour when recommending)
and scored by the dot product with the representation of the last position.

Options (`ModelConfig`, each testable alone; the repeat-aware score is on by default, chosen on
validation data, the others are off):

* ``target_conditioning='film'``: the query is ``h * (1 + gamma_b) + beta_b`` for the behaviour b
  we score for. Without it the context cannot change a ranking: fuse is linear, so the candidate
  embedding is ``W1 e_item + (W2 c_b + bias)`` and the second term adds the same to every
  candidate of one query.
* ``repeat_score``: score(i) += sum over the window's occurrences j of item i of
  ``phi[b, b_j, bucket(age_j)]`` plus, when i is in the window at all, a gate
  ``u_b . h + c_b`` (the repeat/explore mix); each of phi, u, c is a table row shared by all
  target behaviours plus the row of b. Items outside the window get nothing, so full
  ranking is the matrix product plus a scatter over the window.
* ``behaviour_attention``: a first block where each position attends, per behaviour, to earlier
  events of that behaviour only, the per-behaviour results summed (HMAR, without its leaks).

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

    def forward_last(self, x: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`forward`'s output at the last position only, [B, 1, d], for inference (no dropout):
        keys and values of every position, the query, attention and FFN of the last. x: [B, W, d];
        attend: bool [B, 1, 1, W] (the last query's row); keep: float [B, 1, 1]."""
        batch, width, dim = x.shape
        normed = self.attention_norm(x)
        weight, bias = self.qkv.weight, self.qkv.bias
        k, v = F.linear(normed, weight[dim:], bias[dim:]).chunk(2, dim=-1)
        q = F.linear(normed[:, -1:], weight[:dim], bias[:dim])

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=attend)
        last = (x[:, -1:] + self.attention_out(attended.transpose(1, 2).reshape(batch, 1, dim))) * keep
        return (last + self.ffn(self.ffn_norm(last))) * keep


class BehaviourMaskedBlock(SelfAttentionBlock):
    """HMAR's behaviour-masked attention: per behaviour b, causal attention restricted to keys of
    behaviour b (shared projections), the per-behaviour outputs summed; then the FFN."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, attend: torch.Tensor, keep: torch.Tensor, behaviours: torch.Tensor
    ) -> torch.Tensor:
        """x [B, W, d]; attend bool [B, 1, W, W] (causal, real keys); behaviours int64 [B, W]."""
        batch, width, dim = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).chunk(3, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, width, self.num_heads, dim // self.num_heads).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        self_loop = torch.eye(width, dtype=torch.bool, device=x.device)
        total = torch.zeros_like(q)
        for behaviour in torch.unique(behaviours[behaviours > 0]).tolist():
            keys = attend & (behaviours == behaviour)[:, None, None, :]
            has_key = keys.any(-1, keepdim=True)  # [B, 1, W, 1]
            # Rows without a key of this behaviour attend to themselves (no NaN) and are dropped.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keys | (self_loop & ~has_key),
                dropout_p=self.dropout if self.training else 0.0,
            )
            total = total + out * has_key
        attended = total.transpose(1, 2).reshape(batch, width, dim)
        x = (x + self.attention_dropout(self.attention_out(attended))) * keep
        return (x + self.ffn(self.ffn_norm(x))) * keep


def age_buckets(ages: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bucket min(floor(log2(age + 1)), num_buckets - 1) of non-negative int64 ages."""
    return torch.floor(torch.log2(ages.clamp(min=0).double() + 1.0)).long().clamp(max=num_buckets - 1)


def window_matches(items: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which window events each candidate repeats, causally: for sequences items [B, W] and
    candidates [B, W, C] (per query position), ``matched`` bool [B, W, C, W] (candidate c at
    position t equals the real event j <= t) and ``earlier`` bool [B, W, W] (j <= t, j real)."""
    position = torch.arange(items.shape[1], device=items.device)
    earlier = (position[:, None] >= position[None, :]) & (items != 0)[:, None, :]
    matched = (candidates.unsqueeze(-1) == items[:, None, None, :]) & earlier[:, :, None, :]
    return matched, earlier


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
        self.behaviour_block = BehaviourMaskedBlock(cfg) if cfg.behaviour_attention else None
        self.blocks = nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(cfg.num_blocks))
        self.final_norm = nn.LayerNorm(d)
        rows = num_behaviours + 1
        # Per target behaviour tables, zero at start (FiLM starts as the plain model, the repeat
        # term as nothing). In the repeat tables row 0 is shared by every target and added to the
        # target's own row: the target is often rare (2 % of Taobao events) and learns from its
        # own positions only what differs from the common repeat pattern.
        self.target_scale = self.target_shift = None
        if cfg.target_conditioning == "film":
            self.target_scale = nn.Embedding(rows, d)
            self.target_shift = nn.Embedding(rows, d)
        self.repeat_weight = self.repeat_gate = self.repeat_gate_bias = self.repeat_base_scale = None
        if cfg.repeat_score:
            self.repeat_weight = nn.Embedding(rows, rows * cfg.repeat_age_buckets)  # [b*, (b_j, bucket)]
            self.repeat_gate = nn.Embedding(rows, d)
            self.repeat_gate_bias = nn.Embedding(rows, 1)
            self.repeat_base_scale = nn.Embedding(rows, 1)  # window items' base score * (1 + this)
        self._init_weights()

    def _behaviour_tables(self) -> list[nn.Embedding]:
        """Tables with one row per behaviour that grow with the vocabulary (row 0: padding in the
        context table, the row shared by every target in the option tables)."""
        tables = [
            self.context_embedding, self.target_scale, self.target_shift,
            self.repeat_gate, self.repeat_gate_bias, self.repeat_base_scale,
        ]
        return [t for t in tables if t is not None]

    def _init_weights(self) -> None:
        for table in self._behaviour_tables():
            if table is not self.context_embedding:
                nn.init.zeros_(table.weight)
        if self.repeat_weight is not None:
            nn.init.zeros_(self.repeat_weight.weight)
            with torch.no_grad():  # shared row: window items start without their base score
                self.repeat_base_scale.weight[0] = self.cfg.repeat_base_scale_init
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

    def encode(self, items: torch.Tensor, behaviours: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Causal representations [B, W, d] of left-padded sequences items/behaviours [B, W].
        Position t sees events 0..t only; padded positions come out as zeros. `last_only`
        (inference: no dropout in the last block) returns the last position's only, [B, 1, d]."""
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
        if self.behaviour_block is not None:
            x = self.behaviour_block(x, causal & real[:, None, None, :], keep, behaviours)
        if last_only:
            for block in self.blocks[:-1]:
                x = block(x, attend, keep)
            x = self.blocks[-1].forward_last(x, attend[:, :, -1:, :], keep[:, -1:])
            return self.final_norm(x) * keep[:, -1:]
        for block in self.blocks:
            x = block(x, attend, keep)
        return self.final_norm(x) * keep

    def user_representation(self, items: torch.Tensor, behaviours: torch.Tensor) -> torch.Tensor:
        """Representation [B, d] of each sequence after its newest event (last column). In eval
        mode the last block runs for the last position only (the same numbers; 1.22x the users per
        second at the default shape, `bench/bench_serve.py refresh`: what the serving path pays
        per refreshed user)."""
        return self.encode(items, behaviours, last_only=not self.training and len(self.blocks) > 0)[:, -1, :]

    def query(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The vector candidates are scored against: representations hidden [..., d] conditioned
        on the behaviour `target` (int64 [...]) we score for; `hidden` itself without conditioning."""
        if self.target_scale is None:
            return hidden
        return hidden * (1.0 + self.target_scale(target)) + self.target_shift(target)

    def repeat_gate_of(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The repeat/explore mix [...]: added to every window item's score."""
        gate = self._shared_plus(self.repeat_gate, target)
        return (hidden * gate).sum(-1) + self._shared_plus(self.repeat_gate_bias, target).squeeze(-1)

    def _shared_plus(self, table: nn.Embedding, target: torch.Tensor) -> torch.Tensor:
        """Row 0 of a per-target table (shared by all targets) plus the rows of `target`."""
        return table(target) + table.weight[0]

    def _occurrence_weights(self, target: torch.Tensor, behaviours: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
        """phi[target, behaviour_j, bucket_j]: target int64 [B, T], behaviours and buckets int64
        [B, T, J] (or [B, J] with T == 1 squeezed by the caller) -> [B, T, J]."""
        rows = self._shared_plus(self.repeat_weight, target)  # [B, T, rows * buckets]
        return rows.gather(-1, behaviours * self.cfg.repeat_age_buckets + buckets)

    def candidate_logits(
        self,
        hidden: torch.Tensor,
        items: torch.Tensor,
        behaviours: torch.Tensor,
        candidates: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [B, W, C] of candidates int64 [B, W, C] at every position of sequences items /
        behaviours [B, W] with representations hidden [B, W, d] (from `encode`), scored for the
        behaviour target int64 [B, W] (in training: the next event's behaviour): `base_logits`
        plus `repeat_logits`. The full-ranking path (`full_logits`) gives the same numbers for
        the last position."""
        logits = self.base_logits(hidden, candidates, target)
        if self.repeat_weight is None:
            return logits
        repeat, in_window = self.repeat_logits(hidden, items, behaviours, candidates, target)
        scale = self._shared_plus(self.repeat_base_scale, target)  # [B, W, 1]
        return logits * (1.0 + scale * in_window) + repeat

    def base_logits(self, hidden: torch.Tensor, candidates: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The dot products [B, W, C] of the (target-conditioned) query with the candidates'
        embeddings; arguments as `candidate_logits`."""
        query = self.query(hidden, target)
        embedded = self.embed(candidates, target.unsqueeze(-1).expand_as(candidates))
        return (query.unsqueeze(2) * embedded).sum(-1)

    def repeat_logits(
        self,
        hidden: torch.Tensor,
        items: torch.Tensor,
        behaviours: torch.Tensor,
        candidates: torch.Tensor,
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The repeat term [B, W, C] (0 for candidates outside the window up to each position)
        and whether each candidate is in the window (float 0/1, [B, W, C]); arguments as
        `candidate_logits`. Needs `repeat_score`."""
        width = items.shape[1]
        position = torch.arange(width, device=items.device)
        ages = position[:, None] - position[None, :]  # [W(query), W(key)]
        matches, earlier = window_matches(items, candidates)
        buckets = age_buckets(ages, self.cfg.repeat_age_buckets).expand(items.shape[0], -1, -1)
        weights = self._occurrence_weights(target, behaviours[:, None, :].expand(-1, width, -1), buckets)
        weights = weights * earlier
        matched = matches.to(weights.dtype)
        repeat = torch.einsum("btcj,btj->btc", matched, weights)
        in_window = matched.amax(-1)
        return repeat + in_window * self.repeat_gate_of(hidden, target).unsqueeze(-1), in_window

    def full_logits(
        self,
        items: torch.Tensor,
        behaviours: torch.Tensor,
        target: int,
        candidates: torch.Tensor,
        window_items: torch.Tensor | None = None,
        num_columns: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, num_items + 1] of every item after sequences items / behaviours [B, W] for
        behaviour `target`; `candidates` is ``candidate_matrix(target)`` (computed once by callers).
        Column 0 (padding) holds junk: callers mask it.

        Items newer than the model (a live service learns them at its next fine-tune): `items`
        holds them as 0 (the encoder cannot read them), `window_items` [B, W] as their indices,
        and the result has `num_columns` columns: such an item scores its repeat term alone when
        it is in the window (its base score is unknown), -inf otherwise."""
        window = items if window_items is None else window_items
        hidden = self.user_representation(items, behaviours)
        target_t = torch.full((items.shape[0], 1), target, dtype=torch.int64, device=items.device)
        logits = self.query(hidden, target_t[:, 0]) @ candidates.T
        known = logits.shape[1]
        if num_columns is not None and num_columns > known:
            logits = torch.cat([logits, logits.new_zeros(logits.shape[0], num_columns - known)], dim=1)
        if self.repeat_weight is not None:
            width = items.shape[1]
            ages = torch.arange(width - 1, -1, -1, device=items.device)  # the newest event has age 0
            buckets = age_buckets(ages, self.cfg.repeat_age_buckets).expand(items.shape[0], 1, -1)
            weights = self._occurrence_weights(target_t, behaviours[:, None, :], buckets)[:, 0] * (window != 0)
            # Per distinct item once (at its newest occurrence): the gate, and the change of its
            # base score by the window scale.
            newest = ~(window[:, :, None] == window[:, None, :]).triu(diagonal=1).any(-1) & (window != 0)
            gate = self.repeat_gate_of(hidden, target_t[:, 0])[:, None]
            scale = self._shared_plus(self.repeat_base_scale, target_t[:, 0])  # [B, 1]
            once = (gate + scale * logits.gather(1, window)) * newest
            logits = logits.scatter_add(1, window, weights + once)
        if logits.shape[1] > known:
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, window, True)
            unscored = seen[:, known:] if self.repeat_weight is not None else torch.zeros_like(seen[:, known:])
            logits[:, known:] = torch.where(unscored, logits[:, known:], -torch.inf)
        return logits

    def next_behaviour_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., num_behaviours + 1] of the next event's behaviour from hidden [..., d]:
        the context table read as an output layer (weights tied with the input), column 0 unused."""
        table = self.context_embedding.weight if self.context_embedding is not None else None
        if table is None or table.shape[1] != hidden.shape[-1]:
            raise ValueError("the next-behaviour loss needs use_context and context_dim == hidden_dim")
        return hidden @ table.T

    def candidate_matrix(self, behaviour: int) -> torch.Tensor:
        """Every item (row 0 = padding) embedded with context `behaviour`: [num_items + 1, d]."""
        items = torch.arange(self.item_embedding.num_embeddings, device=self.item_embedding.weight.device)
        return self.embed(items, torch.full_like(items, behaviour))

    def _grow_repeat_weight(self, rows: int) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Enlarge phi [rows, rows * buckets] in both axes; old weights keep their place (a
        column is behaviour * buckets + bucket, so the old columns are a prefix), new ones are 0."""
        table = self.repeat_weight
        if table is None or rows <= table.num_embeddings:
            return []
        old, old_rows, buckets = table.weight, table.num_embeddings, self.cfg.repeat_age_buckets
        grown = old.new_zeros(rows, rows * buckets)
        grown[:old_rows, : old_rows * buckets] = old.detach()
        table.weight = nn.Parameter(grown)
        table.num_embeddings, table.embedding_dim = rows, rows * buckets
        return [(old, table.weight)]

    def grow(self, num_items: int, num_behaviours: int | None = None) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Enlarge the item (and context) tables to hold `num_items` items (`num_behaviours`
        behaviours), keeping existing rows. Returns (old, new) parameter pairs so an optimizer
        can carry its state over; empty when nothing grew."""
        replaced = []
        pairs = [(self.item_embedding, num_items + 1)]
        if num_behaviours is not None:
            pairs += [(table, num_behaviours + 1) for table in self._behaviour_tables()]
            replaced += self._grow_repeat_weight(num_behaviours + 1)
        for table, rows in pairs:
            old = table.weight
            if rows <= old.shape[0]:
                continue
            extra = torch.empty(rows - old.shape[0], old.shape[1], device=old.device, dtype=old.dtype)
            if table is self.item_embedding or table is self.context_embedding:
                nn.init.normal_(extra, std=self.cfg.init_std)
            else:
                nn.init.zeros_(extra)
            new = nn.Parameter(torch.cat([old.detach(), extra], dim=0))
            table.weight = new
            table.num_embeddings = rows
            replaced.append((old, new))
        return replaced
