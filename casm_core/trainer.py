"""Training CASM with the weighted BCE: offline (epochs, early stopping on validation) and the
`fine_tune` step the live service calls on mini-batches of recent sequences.

The trainer owns the model, its optimizer, the item vocabulary and the current alpha_b. The item
table (and Adam's state for it) grows in place when new items arrive.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from casm_core.config import BehaviourConfig, ModelConfig, TrainConfig
from casm_core.loss import weighted_bce
from casm_core.model import CASM, window_matches
from casm_core.sampling import NegativeSampler, SequenceCorpus, TrainingBatch, training_batch
from casm_core.vocab import Vocabulary

log = logging.getLogger(__name__)

Validator = Callable[[CASM], Mapping[str, float]]


def resolve_device(name: str) -> torch.device:
    """'auto' is cuda when available, else cpu; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StepStats:
    """What one or more optimisation steps saw: mean loss over target positions, the number of
    positions, and the mean loss per target behaviour (by name)."""

    loss: float
    positions: int
    loss_by_behaviour: dict[str, float] = field(default_factory=dict)


@dataclass
class FitReport:
    """Outcome of offline training: steps run, the best step and its validation metrics; `epochs`
    is the number of training sequences seen divided by the number of trainable users."""

    steps: int
    best_step: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    stopped_early: bool
    seconds: float = 0.0
    sequences_per_second: float = 0.0
    epochs: float = 0.0


class Trainer:
    """Model + optimizer + vocabulary + alpha. `behaviours.names` fixes behaviour indices
    (1-based in that order); `item_ids` the initial item vocabulary."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        behaviours: BehaviourConfig,
        item_ids: Sequence[str] = (),
        device: str | torch.device = "cpu",
    ) -> None:
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.behaviours = behaviours.model_copy(deep=True)
        self.items = Vocabulary(item_ids)
        self.device = resolve_device(device) if isinstance(device, str) else device
        torch.manual_seed(train_cfg.seed)
        self.rng = np.random.default_rng(train_cfg.seed)
        self.model = CASM(model_cfg, len(self.items), len(self.behaviours.names)).to(self.device)
        repeat = [p for name, p in self.model.named_parameters() if name.startswith("repeat_")]
        rest = [p for name, p in self.model.named_parameters() if not name.startswith("repeat_")]
        groups = [{"params": rest}]
        if repeat:
            groups.append({"params": repeat, "lr": train_cfg.learning_rate * train_cfg.repeat_lr_scale})
        self.optimizer = torch.optim.Adam(
            groups,
            lr=train_cfg.learning_rate,
            betas=train_cfg.adam_betas,
            weight_decay=train_cfg.weight_decay,
        )
        self._popularity: np.ndarray | None = None
        self.sampler = NegativeSampler(len(self.items))
        self.steps = 0

    # ----------------------------------------------------------------------------- alpha
    @property
    def alpha(self) -> dict[str, float]:
        """Current alpha_b of every behaviour in the vocabulary."""
        return {name: self.behaviours.alpha_of(name) for name in self.behaviours.names}

    def set_alpha(self, alpha: Mapping[str, float]) -> dict[str, float]:
        """Change alpha_b of the named behaviours from the next step on; returns the old alpha."""
        old = self.alpha
        unknown = set(alpha) - set(self.behaviours.names)
        if unknown:
            raise ValueError(f"unknown behaviours in alpha: {sorted(unknown)}")
        if any(value < 0 or not math.isfinite(value) for value in alpha.values()):
            raise ValueError(f"alpha must be finite and >= 0: {dict(alpha)}")
        self.behaviours.alpha = {**self.behaviours.alpha, **{k: float(v) for k, v in alpha.items()}}
        return old

    def _alpha_vector(self) -> torch.Tensor:
        """alpha by behaviour index, [num_behaviours + 1], 0 for padding."""
        values = [0.0] + [self.behaviours.alpha_of(name) for name in self.behaviours.names]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    # ------------------------------------------------------------------------ vocabulary
    def add_behaviours(self, names: Sequence[str]) -> None:
        """Append behaviours (an open vocabulary) and grow the context table for them."""
        new = [n for n in names if n not in self.behaviours.names]
        if new:
            self.behaviours.names = [*self.behaviours.names, *new]
            self.grow()

    def add_items(self, external_ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Indices of `external_ids`, adding new ones to the vocabulary and the model."""
        codes = self.items.add(external_ids)
        self.grow()
        return codes

    def reindex_items(self, external_ids: Sequence[str]) -> int:
        """Adopt another vocabulary order (e.g. the state store's): item index i+1 becomes
        ``external_ids[i]``. Known items keep their embedding rows (moved), new ones get fresh rows;
        Adam's state for the item table is reset. Returns how many items were known."""
        old_codes = self.items.lookup(list(external_ids))
        old_weight = self.model.item_embedding.weight
        new_vocab = Vocabulary(external_ids)
        rows = torch.empty(new_vocab.table_size, old_weight.shape[1], device=old_weight.device)
        torch.nn.init.normal_(rows, std=self.model_cfg.init_std)
        rows[0] = 0.0
        known = torch.as_tensor(np.flatnonzero(old_codes) + 1, device=old_weight.device)
        rows[known] = old_weight.detach()[torch.as_tensor(old_codes[old_codes > 0], device=old_weight.device)]
        new_weight = torch.nn.Parameter(rows)
        self.model.item_embedding.weight = new_weight
        self.model.item_embedding.num_embeddings = new_vocab.table_size
        self._replace_in_optimizer(old_weight, new_weight, keep_state=False)
        self.items = new_vocab
        self.sampler = NegativeSampler(len(self.items))
        self._popularity = None
        return int(known.numel())

    def grow(self) -> bool:
        """Make the model hold every item of the vocabulary and every behaviour; the optimizer's
        state for grown tables is kept (zeros for new rows). True when a table grew."""
        num_items = len(self.items)
        replaced = self.model.grow(num_items, len(self.behaviours.names))
        for old, new in replaced:
            self._replace_in_optimizer(old, new)
        if self.sampler.num_items != num_items:
            self.sampler = NegativeSampler(
                num_items, self._popularity, self.train_cfg.popularity_exponent
            ) if self._popularity is not None else NegativeSampler(num_items)
        return bool(replaced)

    def _replace_in_optimizer(
        self, old: torch.nn.Parameter, new: torch.nn.Parameter, keep_state: bool = True
    ) -> None:
        """Point the optimizer at `new` instead of `old`; with keep_state, carry Adam's moments
        over (zeros for the added rows)."""
        for group in self.optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                if param is old:
                    group["params"][i] = new
        state = self.optimizer.state.pop(old, None)
        if state and keep_state:
            extra = new.shape[0] - old.shape[0]
            if new.shape[1:] != old.shape[1:]:  # grown in more than rows: start its moments anew
                return
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == old.shape:
                    state[key] = torch.cat([value, value.new_zeros((extra, *value.shape[1:]))])
            self.optimizer.state[new] = state

    def set_popularity(self, counts: np.ndarray) -> None:
        """Item counts [num_items + 1] for the popularity negative sampler (ignored when uniform)."""
        if self.train_cfg.negative_sampler == "popularity":
            self._popularity = np.asarray(counts, dtype=np.float64)
            self.sampler = NegativeSampler(len(self.items), self._popularity, self.train_cfg.popularity_exponent)

    # -------------------------------------------------------------------------- training
    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.int64, device=self.device)

    def _losses(self, batch: TrainingBatch, weighted: bool = True):
        """The forward pass of a step: (the WeightedBCE of the batch, the total loss with the
        next-behaviour term, target behaviours [B, W], has_target [B, W]). Unweighted, every
        positive weighs 1 (per-behaviour losses for the gradient similarity)."""
        input_items = self._tensor(batch.input_items)
        input_behaviours = self._tensor(batch.input_behaviours)
        target_items = self._tensor(batch.target_items)
        target_behaviours = self._tensor(batch.target_behaviours)
        negative_items = self._tensor(batch.negatives)
        hidden = self.model.encode(input_items, input_behaviours)  # [B, W, d]
        # Positive and negatives are scored for the positive event's behaviour.
        candidates = torch.cat([target_items.unsqueeze(-1), negative_items], dim=-1)
        logits = self.model.candidate_logits(hidden, input_items, input_behaviours, candidates, target_behaviours)
        if self.train_cfg.window_negatives:
            logits = logits - self._sampling_correction(input_items, candidates, self.sampler.num_items)
        has_target = self._tensor(batch.has_target).bool()
        weights = self._alpha_vector()[target_behaviours] if weighted else torch.ones_like(logits[..., 0])
        result = weighted_bce(logits[..., 0], logits[..., 1:], weights, has_target, negative_items != 0)
        loss = result.loss
        if self.train_cfg.next_behaviour_weight > 0:
            predicted = self.model.next_behaviour_logits(hidden)[has_target]
            loss = loss + self.train_cfg.next_behaviour_weight * F.cross_entropy(predicted, target_behaviours[has_target])
        return result, loss, target_behaviours, has_target

    def step(self, batch: TrainingBatch) -> StepStats:
        """One optimisation step of the weighted BCE (plus the next-behaviour loss when its
        weight is set) on `batch`; with window negatives, on log-Q corrected logits."""
        self.model.train()
        result, loss, target_behaviours, has_target = self._losses(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return self._stats(result.per_position, target_behaviours, has_target, result.loss.item())

    def gradient_similarity(self, items: np.ndarray, behaviours: np.ndarray) -> dict[str, float]:
        """Cosine similarity between the gradient of each behaviour's loss and the target's
        (Du et al. 2018, "Adapting Auxiliary Losses Using Gradient Similarity"), on one batch of
        the left-padded sequences items/behaviours [n, N]: behaviour b's loss is the unweighted
        BCE of the positions whose next event is b; gradients over every trainable weight. No
        step is taken. Behaviours without a position in the batch are left out; the target's own
        similarity is 1. Cost: one forward and one backward pass per behaviour present."""
        corpus = SequenceCorpus.from_padded(items, behaviours)
        eligible = np.flatnonzero(corpus.lengths >= 2)
        if eligible.size == 0:
            return {}
        self._check_known(items)
        self.grow()
        take = self.rng.choice(eligible, size=min(self.train_cfg.batch_size, eligible.size), replace=False)
        self.model.train()
        result, _, target_behaviours, has_target = self._losses(self._batch(corpus, take), weighted=False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        gradients: dict[str, torch.Tensor] = {}
        for index, name in enumerate(self.behaviours.names, start=1):
            mask = has_target & (target_behaviours == index)
            if not bool(mask.any()):
                continue
            # per_position is detached: recompute the behaviour's mean from the graph's loss.
            loss_b = self._behaviour_loss(result, mask)
            grads = torch.autograd.grad(loss_b, params, retain_graph=True, allow_unused=True)
            gradients[name] = torch.cat([
                (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)
            ])
        target = self.behaviours.target
        if target not in gradients:
            return {}
        reference = gradients[target]
        return {name: float(F.cosine_similarity(g, reference, dim=0).clamp(-1.0, 1.0)) for name, g in gradients.items()}

    @staticmethod
    def _behaviour_loss(result, mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over the positions of `mask` [B, W], differentiable."""
        return (result.per_position_graph * mask).sum() / mask.sum().clamp(min=1)

    def _sampling_correction(
        self, items: torch.Tensor, candidates: torch.Tensor, num_items: int
    ) -> torch.Tensor:
        """log Q correction [B, W, C] of the training logits (Yi et al. 2019, "Sampling-bias-
        corrected neural modeling"), for candidates ordered positive, K sampled, M window.
        With negatives from two distributions, BCE learns a candidate's log-odds against the rate
        at which it is drawn as a negative: K/N per item for the uniform sampler (which never
        draws the user's own items), M * n_c / |w_t| for an item occurring n_c times among the
        |w_t| window events up to t. Subtracting log(rate / (K/N)) from window items' logits in
        training puts both on one scale, so at inference a window item's score is comparable
        with any other item's. 0 for candidates outside the window."""
        cfg = self.train_cfg
        # The sampled negatives never touch the user's items: only the positive and the window
        # negatives can be window items.
        near = torch.cat([candidates[..., :1], candidates[..., 1 + cfg.num_negatives :]], dim=-1)
        matched, earlier = window_matches(items, near)
        counts = matched.sum(-1)
        seen = earlier.sum(-1, keepdim=True).clamp(min=1)  # |w_t|, [B, W, 1]
        ratio = cfg.window_negatives * counts * num_items / (cfg.num_negatives * seen)
        near_correction = torch.where(counts > 0, torch.log(ratio.clamp(min=1e-12)), 0.0).float()
        sampled = near_correction.new_zeros(*near_correction.shape[:-1], cfg.num_negatives)
        return torch.cat([near_correction[..., :1], sampled, near_correction[..., 1:]], dim=-1)

    def _stats(
        self, per_position: torch.Tensor, behaviours: torch.Tensor, has_target: torch.Tensor, loss: float
    ) -> StepStats:
        size = len(self.behaviours.names) + 1
        picked = behaviours[has_target]
        sums = torch.bincount(picked, weights=per_position[has_target], minlength=size).cpu().numpy()
        counts = torch.bincount(picked, minlength=size).cpu().numpy()
        by_behaviour = {
            name: float(sums[i + 1] / counts[i + 1])
            for i, name in enumerate(self.behaviours.names)
            if counts[i + 1] > 0
        }
        return StepStats(loss=loss, positions=int(counts.sum()), loss_by_behaviour=by_behaviour)

    def _batch(self, corpus: SequenceCorpus, users: np.ndarray) -> TrainingBatch:
        lengths = corpus.lengths[users]
        if self.train_cfg.window == "random":
            ends = self.rng.integers(2, lengths + 1)
        else:
            ends = lengths
        items, behaviours = corpus.windows(users, ends, self.model_cfg.max_len + 1)
        excluded = corpus.item_keys(users, self.sampler.num_items + 1)
        return training_batch(
            items, behaviours, excluded, self.sampler, self.train_cfg.num_negatives, self.rng,
            self.train_cfg.window_negatives,
        )

    def _event_batch(self, corpus: SequenceCorpus, eligible: np.ndarray) -> TrainingBatch:
        """A batch of windows ending at events drawn uniformly from `eligible` (corpus positions
        with at least one earlier event of the same user)."""
        picks = self.rng.choice(eligible, size=min(self.train_cfg.batch_size, eligible.size), replace=False)
        users = np.searchsorted(corpus.offsets, picks, side="right") - 1
        ends = picks - corpus.offsets[users] + 1
        items, behaviours = corpus.windows(users, ends, self.model_cfg.max_len + 1)
        excluded = corpus.item_keys(users, self.sampler.num_items + 1)
        return training_batch(
            items, behaviours, excluded, self.sampler, self.train_cfg.num_negatives, self.rng,
            self.train_cfg.window_negatives,
        )

    def _check_known(self, items: np.ndarray) -> None:
        largest = int(items.max(initial=0))
        if largest > len(self.items):
            raise ValueError(
                f"item index {largest} is beyond the vocabulary ({len(self.items)} items): "
                "add the new items (add_items) before training on them"
            )

    def fine_tune(self, items: np.ndarray, behaviours: np.ndarray, steps: int = 1) -> StepStats:
        """`steps` optimisation steps on left-padded sequences items/behaviours [n, N] (e.g. a
        sample from the state store), `batch_size` rows per step. Negatives avoid each row's own
        items. Returns the mean statistics over the steps."""
        corpus = SequenceCorpus.from_padded(items, behaviours)
        eligible = np.flatnonzero(corpus.lengths >= 2)
        if eligible.size == 0:
            return StepStats(loss=float("nan"), positions=0)
        self._check_known(items)
        self.grow()
        collected = []
        for _ in range(steps):
            take = self.rng.choice(eligible, size=min(self.train_cfg.batch_size, eligible.size), replace=False)
            collected.append(self.step(self._batch(corpus, take)))
        return _mean_stats(collected)

    def fit(
        self,
        corpus: SequenceCorpus,
        validate: Validator | None = None,
        progress: bool = True,
        description: str = "train",
    ) -> FitReport:
        """Train on the users of `corpus` with >= 2 events for up to `max_steps` optimisation
        steps (learning rate warmed up over `warmup_steps`, then constant or cosine-decayed),
        validating every `validate_every_steps` steps and stopping when `early_stopping_metric`
        has not improved for `patience_steps` steps; the best weights are restored at the end.
        Batches come from passes over the users (`sampling='users'`) or from events drawn
        uniformly (`'events'`). `FitReport.epochs` counts steps' worth of passes over the users."""
        cfg = self.train_cfg
        self._check_known(corpus.items)
        self.grow()
        if cfg.negative_sampler == "popularity":
            self.set_popularity(np.bincount(corpus.items, minlength=len(self.items) + 1))
        users = np.flatnonzero(corpus.lengths >= 2)
        if users.size == 0:
            raise ValueError("no user has the two events a training sequence needs")
        eligible = np.flatnonzero(np.arange(corpus.items.size) - np.repeat(corpus.offsets[:-1], corpus.lengths) >= 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: learning_rate_factor(cfg, step))
        history: list[dict[str, float]] = []
        best_metric, best_step, best_metrics, best_state = -math.inf, 0, {}, None
        started = time.perf_counter()
        sequences, losses, order = 0, [], np.zeros(0, np.int64)
        bar = tqdm(range(1, cfg.max_steps + 1), desc=description, disable=not progress, unit="step")
        step = 0
        stopped_early = False
        for step in bar:
            if cfg.sampling == "events":
                batch = self._event_batch(corpus, eligible)
            else:
                if order.size == 0:
                    order = self.rng.permutation(users)
                batch, order = self._batch(corpus, order[: cfg.batch_size]), order[cfg.batch_size :]
            losses.append(self.step(batch).loss)
            schedule.step()
            sequences += batch.input_items.shape[0]
            if step % cfg.validate_every_steps and step != cfg.max_steps:
                continue
            record: dict[str, float] = {"step": step, "loss": float(np.mean(losses)), "lr": schedule.get_last_lr()[0]}
            losses = []
            if validate is not None:
                metrics = dict(validate(self.model))
                record.update({f"val.{k}": v for k, v in metrics.items()})
                current = metrics[cfg.early_stopping_metric]
                if current > best_metric:
                    best_metric, best_step, best_metrics = current, step, metrics
                    best_state = copy.deepcopy(self.model.state_dict())
                bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{current:.4f}", best=f"{best_metric:.4f}")
                log.info(
                    "%s step %d: loss %.4f, validation %s %.4f (best %.4f at step %d)",
                    description, step, record["loss"], cfg.early_stopping_metric, current, best_metric, best_step,
                )
            history.append(record)
            if validate is not None and step - best_step >= cfg.patience_steps:
                stopped_early = True
                break
        bar.close()
        seconds = time.perf_counter() - started
        for group in self.optimizer.param_groups:  # fine-tuning after fit runs at the base rate
            group["lr"] = group["initial_lr"]
        if best_state is not None:
            self.model.load_state_dict(best_state)
        else:
            best_step = step
        return FitReport(
            steps=step,
            best_step=best_step,
            best_metrics=best_metrics,
            history=history,
            stopped_early=stopped_early,
            seconds=seconds,
            sequences_per_second=sequences / seconds if seconds > 0 else 0.0,
            epochs=sequences / users.size,
        )


def learning_rate_factor(cfg: TrainConfig, step: int) -> float:
    """Share of `learning_rate` after `step` steps (0-based): linear warm-up, then constant or a
    cosine decay to `min_lr_ratio` at `max_steps`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _mean_stats(collected: list[StepStats]) -> StepStats:
    positions = sum(s.positions for s in collected)
    if positions == 0:
        return StepStats(loss=float("nan"), positions=0)
    loss = sum(s.loss * s.positions for s in collected) / positions
    names = {name for s in collected for name in s.loss_by_behaviour}
    by_behaviour = {
        name: float(np.mean([s.loss_by_behaviour[name] for s in collected if name in s.loss_by_behaviour]))
        for name in names
    }
    return StepStats(loss=loss, positions=positions, loss_by_behaviour=by_behaviour)
