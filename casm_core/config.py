"""Configuration of the CASM core: the behaviour vocabulary and its weights, the model's shape,
training and evaluation. Plain pydantic models; the service's settings tree nests them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BehaviourConfig(_Section):
    """Which behaviours exist, which one is the target, and alpha_b of the weighted BCE."""

    names: list[str] = Field(
        default_factory=lambda: ["pv", "cart", "fav", "buy"],
        min_length=1,
        description="Behaviour vocabulary in index order (index 0 is reserved for padding).",
    )
    target: str = Field("buy", description="The behaviour we recommend for (scored as candidate context).")
    alpha: dict[str, float] = Field(
        default_factory=lambda: {"pv": 0.67, "cart": 1.0, "fav": 0.67, "buy": 1.0},
        description="Weight alpha_b of a positive whose event has behaviour b (negatives weigh 1). "
        "Defaults: the official CASM code's Tmall weights (pv .2, cart .3, fav .2, buy .3) rescaled "
        "so the target weighs 1, as a negative does.",
    )
    default_alpha: float = Field(
        1.0, ge=0.0, description="alpha of a behaviour that has no entry in `alpha` (e.g. one the "
        "open vocabulary added at run time)."
    )

    @model_validator(mode="after")
    def _check(self) -> BehaviourConfig:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"behaviour names must be unique: {self.names}")
        if self.target not in self.names:
            raise ValueError(f"target behaviour {self.target!r} is not among {self.names}")
        unknown = set(self.alpha) - set(self.names)
        if unknown:
            raise ValueError(f"alpha names behaviours that are not in the vocabulary: {sorted(unknown)}")
        negative = {b: a for b, a in self.alpha.items() if a < 0}
        if negative:
            raise ValueError(f"alpha must be >= 0: {negative}")
        return self

    def alpha_of(self, name: str) -> float:
        """alpha_b for behaviour `name` (the default for behaviours without an entry)."""
        return self.alpha.get(name, self.default_alpha)

    def target_index(self) -> int:
        """Dense index (1-based; 0 is padding) of the target behaviour."""
        return self.names.index(self.target) + 1


class ModelConfig(_Section):
    """Shape of the CASM network (arXiv 2312.09684, section 3)."""

    hidden_dim: int = Field(64, ge=1, description="Width d of item embeddings and of the transformer.")
    context_dim: int = Field(
        64, ge=1, description="Width of the behaviour-context embedding concatenated to the item embedding."
    )
    num_blocks: int = Field(2, ge=1, description="Number of self-attention + feed-forward blocks.")
    num_heads: int = Field(1, ge=1, description="Attention heads per block (must divide hidden_dim).")
    ffn_dim: int = Field(64, ge=1, description="Inner width of the point-wise feed-forward layer.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout on embeddings, attention and FFN.")
    max_len: int = Field(50, ge=2, description="Sequence length L the model reads (the most recent L events).")
    use_context: bool = Field(
        True,
        description="Concatenate the behaviour-context embedding (CASM). False gives the SASRec variant: "
        "items only.",
    )
    init_std: float = Field(0.02, gt=0.0, description="Std of the normal init of item and context embeddings.")
    target_conditioning: Literal["none", "film"] = Field(
        "none",
        description="How the behaviour we score for enters the query. 'none': only through the candidate "
        "embedding fuse([item; context]), which is linear, so every behaviour gives the same ranking (its "
        "context term is a constant per query). 'film': the user representation h is scaled and shifted "
        "per target behaviour, q = h * (1 + gamma_b) + beta_b (tables initialised at 0), so the ranking "
        "for buy can differ from the one for pv.",
    )
    repeat_score: bool = Field(
        True,
        description="(On by default: chosen on validation, see EVALUATION.md.) Add a repeat-aware term "
        "to the score of items in the user's window: for every earlier occurrence of the candidate, a learned weight per (target behaviour, that occurrence's "
        "behaviour, age bucket), summed, plus a repeat gate from the user representation and the target "
        "behaviour (a learned repeat/explore mix, as RepeatNet). Only window items get the term, so full "
        "ranking stays one matrix product plus a scatter. Causal: at position t only events <= t count.",
    )
    repeat_age_buckets: int = Field(
        8, ge=1, description="Age buckets of the repeat term: an occurrence a positions before the query "
        "falls in bucket min(floor(log2(a + 1)), repeat_age_buckets - 1).",
    )
    repeat_base_scale_init: float = Field(
        -1.0, ge=-1.0, description="With repeat_score, a window item's score is its repeat term plus "
        "(1 + s) times its base score, s learned per target behaviour; this is the start of s. -1: window "
        "items start scored by the repeat term alone (RepeatNet's repeat mode), and learn how much of "
        "the base score to take in; 0: the full base score.",
    )
    behaviour_attention: bool = Field(
        False,
        description="HMAR's behaviour-masked attention, leak-free: before the global blocks, one block "
        "in which each position attends, per behaviour b, only to earlier events of behaviour b; the "
        "per-behaviour outputs are summed.",
    )

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_dim={self.hidden_dim}")
        return self


class TrainConfig(_Section):
    """Optimisation of the weighted BCE, offline and when fine-tuning on the stream."""

    learning_rate: float = Field(1e-3, gt=0.0, description="Adam learning rate.")
    adam_betas: tuple[float, float] = Field((0.9, 0.98), description="Adam (beta1, beta2).")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 penalty (Adam weight_decay) on all weights.")
    grad_clip: float = Field(5.0, ge=0.0, description="Clip the global gradient norm to this (0: off).")
    batch_size: int = Field(128, ge=1, description="Sequences per training step.")
    num_negatives: int = Field(1, ge=1, description="Sampled negatives per position.")
    negative_sampler: Literal["uniform", "popularity"] = Field(
        "uniform", description="Negative distribution over items: uniform, or by training popularity."
    )
    popularity_exponent: float = Field(
        0.75, ge=0.0, description="With negative_sampler=popularity: p(item) ~ count**exponent."
    )
    window: Literal["last", "random"] = Field(
        "random",
        description="Which L+1 events of a longer history a training sequence uses each epoch: the "
        "last ones, or a window ending at a random event (more distinct examples per user).",
    )
    max_steps: int = Field(3_000, ge=1, description="Upper bound on offline optimisation steps.")
    validate_every_steps: int = Field(100, ge=1, description="Steps between validations (offline).")
    patience_steps: int = Field(
        1_000, ge=1, description="Stop when validation has not improved for this many steps (offline)."
    )
    warmup_steps: int = Field(
        100, ge=0, description="Offline: the learning rate rises linearly from 0 over these steps."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="Offline learning rate after warm-up: constant, or cosine decay to "
        "min_lr_ratio * learning_rate at max_steps. Fine-tuning on the stream uses the constant rate.",
    )
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final learning rate of the cosine decay, as a share.")
    sampling: Literal["users", "events"] = Field(
        "users",
        description="Offline batches: 'users' passes over the users in random order (each user once per "
        "pass, a window ending at a random event when window='random'); 'events' draws windows ending "
        "at events drawn uniformly from the whole corpus, so every window of a long history is as "
        "likely as any other.",
    )
    window_negatives: int = Field(
        1, ge=0, description="Extra negatives per position drawn from the user's own earlier events "
        "(never the positive item). The repeat-aware score needs them: the sampled negatives never "
        "touch the user's items, so without them nothing teaches it which window items not to repeat.",
    )
    repeat_lr_scale: float = Field(
        10.0, gt=0.0, description="Learning rate of the repeat-aware score's small tables, as a multiple "
        "of learning_rate: a few hundred weights that start at 0 and must move by whole logits, next to "
        "embeddings that move a little each.",
    )
    next_behaviour_weight: float = Field(
        0.0, ge=0.0, description="Weight of HMAR's auxiliary loss: cross-entropy of the next event's "
        "behaviour predicted from the representation of each position (0: off).",
    )
    early_stopping_metric: str = Field(
        "sampled.ndcg@10", description="Validation metric to maximise, '<sampled|full>.<hr|ndcg>@K'."
    )
    seed: int = Field(0, description="Seed of weights, batch order, windows and negatives.")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: leave torch's default).")


class EvalConfig(_Section):
    """The evaluation protocol: leave-one-out on the last target event (or a global time cut),
    sampled and full ranking, bootstrap intervals over users."""

    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], description="Cut-offs K of HR@K and NDCG@K.")
    num_sampled_negatives: int = Field(
        99, ge=1, description="Sampled protocol: non-interacted items ranked against the positive."
    )
    seed: int = Field(12345, description="Seed of the sampled negatives (the same for every model).")
    batch_size: int = Field(256, ge=1, description="Users scored per evaluation step.")
    min_train_events: int = Field(
        1, ge=1, description="A user needs this many events before the validation event to be evaluated."
    )
    validation_behaviours: list[str] = Field(
        default_factory=list,
        description="Held-out test items only: validate on each user's last event of these "
        "behaviours (empty: of any behaviour).",
    )
    split: Literal["last", "time_cut"] = Field(
        "last",
        description="'last': leave-one-out, test on each user's last target event, validate on the one "
        "before. 'time_cut': every target event at or after the time_cut_test_quantile of event time is "
        "a test case, every one in [time_cut_validation_quantile, time_cut_test_quantile) a validation "
        "case; training uses only events before the validation cut (needs timestamps; not with "
        "held-out test items).",
    )
    time_cut_validation_quantile: float = Field(
        0.6, gt=0.0, lt=1.0,
        description="split=time_cut: quantile of all event times where validation cases begin and "
        "training events end.",
    )
    time_cut_test_quantile: float = Field(
        0.7, gt=0.0, lt=1.0,
        description="split=time_cut: quantile of all event times where test cases begin (above the "
        "validation quantile).",
    )
    full_exclude_history: bool = Field(
        False,
        description="Full ranking: remove from competition every item of the user's events before the "
        "case (the whole input history, not only the model's window), never the positive itself. "
        "Suits sets where an item is met once (MovieLens rates a movie once); keep it off where "
        "users return to items (Taobao re-buys): there the positive would be the only history item "
        "left, which gives it away.",
    )
    bootstrap_replicates: int = Field(
        1000, ge=1, description="Resamples of the evaluated users for the percentile bootstrap intervals."
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resamples (the same for every variant).")
    bootstrap_confidence: float = Field(
        0.95, gt=0.0, lt=1.0, description="Coverage of the bootstrap intervals (0.95: the 2.5 and 97.5 percentiles)."
    )
    table_k: int = Field(
        10, ge=1, description="Cut-off K of HR@K and NDCG@K in the printed tables (one of `ks`; the JSON "
        "result holds every K)."
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.time_cut_validation_quantile >= self.time_cut_test_quantile:
            raise ValueError(
                f"time_cut_validation_quantile={self.time_cut_validation_quantile} must be below "
                f"time_cut_test_quantile={self.time_cut_test_quantile}"
            )
        if self.table_k not in self.ks:
            raise ValueError(f"table_k={self.table_k} must be one of ks={self.ks}")
        return self
