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
    max_epochs: int = Field(200, ge=1, description="Upper bound on offline epochs.")
    patience: int = Field(
        8, ge=1, description="Stop after this many validations without improvement (offline)."
    )
    validate_every: int = Field(2, ge=1, description="Epochs between validations (offline).")
    early_stopping_metric: str = Field(
        "sampled.ndcg@10", description="Validation metric to maximise, '<sampled|full>.<hr|ndcg>@K'."
    )
    seed: int = Field(0, description="Seed of weights, batch order, windows and negatives.")
    threads: int = Field(0, ge=0, description="torch intra-op threads (0: leave torch's default).")


class EvalConfig(_Section):
    """The evaluation protocol: leave-one-out on the last target event, sampled and full ranking."""

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
