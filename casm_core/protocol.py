"""The evaluation protocol of the paper, kept strict.

Leave-one-out per user on the **last target-behaviour event** (test), validation on the target
event before it (never the same item event as the test, unlike the official code). Training
sequences stop before the validation event for evaluated users, so neither the validation nor the
test event (nor anything after them) is trained on; users who cannot be evaluated train on all
their events. The test input is every event before the test event (the validation event included).

Metrics on two candidate sets: (a) sampled: the positive against `num_sampled_negatives` items the
user never interacted with (at any time), drawn once per split with a fixed seed so every model
sees the same candidates; (b) full: the positive against every known item, nothing excluded
by default (the positive is often an item the user viewed before buying, so excluding history would
be wrong on Taobao). With ``exclude_history`` (setting ``eval.full_exclude_history``) every item of
the user's events before the case, the whole history and not only the model's window, is removed
from competition, never the positive itself (which may be one of them: a re-buy); this suits sets
where an item is met once (MovieLens rates a movie once). Where users return to items it leaves the
positive as the only history item in the ranking and so gives it away (on taobao_users 57-59 % of
the test buys are items of the buyer's earlier events).

`rank_cases` gives the 0-based rank of every case (sampled and full), so reports can bootstrap
over users (`casm_core.bootstrap`); `evaluate` summarizes them into metrics.

A variant for data sets whose test items are given apart from the log (``heldout_split``, e.g.
Yelp's held-out "pos" items): the test input is the whole sequence, validation is each user's
last event of the chosen validation behaviours.

A larger evaluation for logs with few users and many target events (``time_cut_split``, setting
``eval.split = "time_cut"``): event times t_val < t_test are quantiles of all events' timestamps.
Every target event at or after t_test is a test case, every one in [t_val, t_test) a validation
case; a case's input is all the user's events before it (events after a cut but before the case
are input, which is causal). Training uses only the events before t_val, so no case (and nothing
after one) is trained on. A user may have several cases. Needs ``EncodedEvents.timestamps``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from casm_core.metrics import rank_among, rank_in_full, summarize
from casm_core.sampling import NegativeSampler, SequenceCorpus

ScoreAll = Callable[[np.ndarray, np.ndarray], "np.ndarray | torch.Tensor"]


@dataclass(frozen=True)
class EncodedEvents:
    """A log as dense codes, in chronological order: users int64 [E] in 0..num_users-1, items
    int64 [E] in 1..num_items, behaviours int64 [E] in 1..num_behaviours, and optionally the event
    times float64 [E] (unix seconds; needed by `time_cut_split` only)."""

    users: np.ndarray
    items: np.ndarray
    behaviours: np.ndarray
    num_users: int
    num_items: int
    timestamps: np.ndarray | None = None


@dataclass(frozen=True)
class EvalCases:
    """One row per evaluated case (a user, or with `time_cut_split` one of a user's target events):
    the input is user `users[i]`'s first `ends[i]` events of the history corpus; `candidates[i]` is
    [positive, sampled negatives...]. All int64, [N] ([N, 1 + negatives] for candidates)."""

    users: np.ndarray
    ends: np.ndarray
    positives: np.ndarray
    candidates: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


@dataclass(frozen=True)
class Split:
    """Training corpus, the full history the inputs are read from, and the two case sets."""

    train: SequenceCorpus
    history: SequenceCorpus
    validation: EvalCases
    test: EvalCases
    num_items: int
    skipped: dict[str, int] = field(default_factory=dict)


def _sampled_candidates(
    history: SequenceCorpus,
    users: np.ndarray,
    positives: np.ndarray,
    num_items: int,
    num_sampled: int,
    seed: int,
    extra_excluded: np.ndarray | None = None,
) -> np.ndarray:
    stride = num_items + 1
    excluded = history.item_keys(users, stride)
    rows = np.arange(len(users), dtype=np.int64)
    own = rows * stride + positives
    if extra_excluded is not None:
        own = np.concatenate([own, rows * stride + extra_excluded])
    excluded = np.union1d(excluded, own)
    negatives = NegativeSampler(num_items).sample(np.random.default_rng(seed), (len(users), num_sampled), excluded, stride)
    return np.concatenate([positives[:, None], negatives], axis=1)


def _last_two_targets(history: SequenceCorpus, target_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the within-sequence position of the last and second-to-last event where
    `target_mask` (aligned with history.items) is set; -1 where there is none."""
    positions = np.flatnonzero(target_mask)
    owners = np.searchsorted(history.offsets, positions, side="right") - 1
    last = np.full(history.num_users, -1, dtype=np.int64)
    second = np.full(history.num_users, -1, dtype=np.int64)
    if positions.size:
        is_last = np.append(owners[1:] != owners[:-1], True)
        last[owners[is_last]] = positions[is_last] - history.offsets[owners[is_last]]
        before = np.flatnonzero(is_last) - 1
        has_before = (before >= 0) & (owners[np.maximum(before, 0)] == owners[is_last])
        users = owners[is_last][has_before]
        second[users] = positions[before[has_before]] - history.offsets[users]
    return last, second


def _train_corpus(history: SequenceCorpus, cut: np.ndarray) -> SequenceCorpus:
    """Each user's events before within-position `cut[u]` (-1: all of them)."""
    lengths = history.lengths
    keep_len = np.where(cut >= 0, np.minimum(cut, lengths), lengths)
    users = np.repeat(np.arange(history.num_users), lengths)
    within = np.arange(history.items.size) - np.repeat(history.offsets[:-1], lengths)
    keep = within < keep_len[users]
    offsets = np.concatenate([[0], np.cumsum(keep_len)]).astype(np.int64)
    return SequenceCorpus(offsets, history.items[keep], history.behaviours[keep])


def leave_one_out(
    events: EncodedEvents,
    target: int,
    num_sampled: int,
    seed: int,
    min_train_events: int = 1,
) -> Split:
    """Split on each user's last (test) and second-to-last (validation) event of behaviour
    index `target`. Users need two target events and `min_train_events` events before the
    validation event; the others are counted in `skipped` and train on all their events."""
    history = SequenceCorpus.from_events(events.users, events.items, events.behaviours, events.num_users)
    last, second = _last_two_targets(history, history.behaviours == target)
    no_target = int((last < 0).sum())
    one_target = int(((last >= 0) & (second < 0)).sum())
    too_short = int(((second >= 0) & (second < min_train_events)).sum())
    evaluated = np.flatnonzero(second >= min_train_events)
    cut = np.full(history.num_users, -1, dtype=np.int64)
    cut[evaluated] = second[evaluated]
    starts = history.offsets[evaluated]
    val_pos, test_pos = history.items[starts + second[evaluated]], history.items[starts + last[evaluated]]
    validation = EvalCases(
        evaluated, second[evaluated], val_pos,
        _sampled_candidates(history, evaluated, val_pos, events.num_items, num_sampled, seed),
    )
    test = EvalCases(
        evaluated, last[evaluated], test_pos,
        _sampled_candidates(history, evaluated, test_pos, events.num_items, num_sampled, seed + 1),
    )
    skipped = {
        "no target event": no_target,
        "one target event": one_target,
        f"fewer than {min_train_events} events before validation": too_short,
    }
    return Split(_train_corpus(history, cut), history, validation, test, events.num_items, skipped)


def heldout_split(
    events: EncodedEvents,
    heldout_users: np.ndarray,
    heldout_items: np.ndarray,
    num_sampled: int,
    seed: int,
    validation_behaviours: Iterable[int] | None = None,
    min_train_events: int = 1,
) -> Split:
    """Split for test items given apart from the log: user `heldout_users[i]` (code) is tested on
    `heldout_items[i]` after their whole sequence; validation is their last event of
    `validation_behaviours` (default: any)."""
    history = SequenceCorpus.from_events(events.users, events.items, events.behaviours, events.num_users)
    if validation_behaviours is None:
        mask = np.ones(history.items.size, dtype=bool)
    else:
        mask = np.isin(history.behaviours, np.fromiter(validation_behaviours, dtype=np.int64))
    last_val, _ = _last_two_targets(history, mask)
    heldout_users = np.asarray(heldout_users, dtype=np.int64)
    heldout_items = np.asarray(heldout_items, dtype=np.int64)
    has_events = history.lengths[heldout_users] > 0
    ok_val = last_val[heldout_users] >= min_train_events
    chosen = has_events & ok_val
    users, items = heldout_users[chosen], heldout_items[chosen]
    cut = np.full(history.num_users, -1, dtype=np.int64)
    cut[users] = last_val[users]
    val_pos = history.items[history.offsets[users] + last_val[users]]
    validation = EvalCases(
        users, last_val[users], val_pos,
        _sampled_candidates(history, users, val_pos, events.num_items, num_sampled, seed, extra_excluded=items),
    )
    test = EvalCases(
        users, history.lengths[users], items,
        _sampled_candidates(history, users, items, events.num_items, num_sampled, seed + 1),
    )
    skipped = {
        "held-out user without events": int((~has_events).sum()),
        f"fewer than {min_train_events} events before validation": int((has_events & ~ok_val).sum()),
    }
    return Split(_train_corpus(history, cut), history, validation, test, events.num_items, skipped)


def _cases_between(
    history: SequenceCorpus, times: np.ndarray, target: int, low: float, high: float, min_events: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Target events with time in [low, high) and at least `min_events` earlier events of their
    user: (users, within-sequence positions, number of target events skipped as too early)."""
    positions = np.flatnonzero((history.behaviours == target) & (times >= low) & (times < high))
    users = np.searchsorted(history.offsets, positions, side="right") - 1
    ends = positions - history.offsets[users]
    keep = ends >= min_events
    return users[keep], ends[keep], int((~keep).sum())


def time_cut_split(
    events: EncodedEvents,
    target: int,
    validation_quantile: float,
    test_quantile: float,
    num_sampled: int,
    seed: int,
    min_train_events: int = 1,
) -> Split:
    """Split at global event-time quantiles (module docstring): validation cases are the target
    events in [t_val, t_test), test cases those at or after t_test, each needing
    `min_train_events` earlier events of its user; training keeps every event before t_val."""
    if events.timestamps is None:
        raise ValueError("the time-cut split needs event timestamps")
    if not 0.0 < validation_quantile < test_quantile < 1.0:
        raise ValueError(f"need 0 < validation_quantile ({validation_quantile}) < test_quantile ({test_quantile}) < 1")
    history = SequenceCorpus.from_events(events.users, events.items, events.behaviours, events.num_users)
    times = np.asarray(events.timestamps, dtype=np.float64)[np.argsort(events.users, kind="stable")]
    t_val, t_test = np.quantile(times, [validation_quantile, test_quantile])
    val_users, val_ends, val_early = _cases_between(history, times, target, t_val, t_test, min_train_events)
    test_users, test_ends, test_early = _cases_between(history, times, target, t_test, np.inf, min_train_events)
    val_pos = history.items[history.offsets[val_users] + val_ends]
    test_pos = history.items[history.offsets[test_users] + test_ends]
    validation = EvalCases(
        val_users, val_ends, val_pos,
        _sampled_candidates(history, val_users, val_pos, events.num_items, num_sampled, seed),
    )
    test = EvalCases(
        test_users, test_ends, test_pos,
        _sampled_candidates(history, test_users, test_pos, events.num_items, num_sampled, seed + 1),
    )
    before = times < t_val
    owners = np.repeat(np.arange(history.num_users), history.lengths)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(owners[before], minlength=history.num_users))]).astype(np.int64)
    train = SequenceCorpus(offsets, history.items[before], history.behaviours[before])
    skipped = {
        f"validation target event with fewer than {min_train_events} earlier events": val_early,
        f"test target event with fewer than {min_train_events} earlier events": test_early,
    }
    return Split(train, history, validation, test, events.num_items, skipped)


def _history_mask(history: SequenceCorpus, users: np.ndarray, ends: np.ndarray, columns: int) -> np.ndarray:
    """bool [len(users), columns]: item i of row r is among user `users[r]`'s first `ends[r]` events."""
    rows = np.repeat(np.arange(len(users), dtype=np.int64), ends)
    within = np.arange(rows.size, dtype=np.int64) - np.repeat(np.cumsum(ends) - ends, ends)
    mask = np.zeros((len(users), columns), dtype=bool)
    mask[rows, history.items[np.repeat(history.offsets[users], ends) + within]] = True
    return mask


@dataclass(frozen=True)
class CaseRanks:
    """0-based ranks int64 [N] of each case's positive: among its sampled candidates, and in full
    ranking (see `metrics`)."""

    sampled: np.ndarray
    full: np.ndarray


def rank_cases(
    score_all: ScoreAll,
    cases: EvalCases,
    history: SequenceCorpus,
    width: int,
    batch_size: int,
    exclude_history: bool = False,
    progress: bool = False,
    description: str = "evaluate",
) -> CaseRanks:
    """Ranks of every case, in case order. `score_all(items, behaviours)` maps left-padded inputs
    [b, width] to scores [b, num_items + 1] (column 0 is padding). `exclude_history`: in full
    ranking, items of the user's events before the case do not compete (the positive always does)."""
    sampled_ranks, full_ranks = [], []
    starts = range(0, len(cases), batch_size)
    for start in tqdm(starts, desc=description, disable=not progress, unit="batch", leave=False):
        part = slice(start, start + batch_size)
        items, behaviours = history.windows(cases.users[part], cases.ends[part], width)
        scores = score_all(items, behaviours)
        if torch.is_tensor(scores):
            scores = scores.float().cpu().numpy()
        rows = np.arange(scores.shape[0])[:, None]
        excluded = (
            _history_mask(history, cases.users[part], cases.ends[part], scores.shape[1]) if exclude_history else None
        )
        sampled_ranks.append(rank_among(scores[rows, cases.candidates[part]]))
        full_ranks.append(rank_in_full(scores, cases.positives[part], excluded))
    empty = np.zeros(0, np.int64)
    return CaseRanks(
        np.concatenate(sampled_ranks) if sampled_ranks else empty,
        np.concatenate(full_ranks) if full_ranks else empty,
    )


def summarize_ranks(ranks: CaseRanks, ks: Iterable[int]) -> dict[str, float]:
    """HR@K, NDCG@K and MRR, sampled ("sampled." keys) and full ranking ("full."), plus "users"
    (the number of cases)."""
    ks = list(ks)
    return {
        **summarize(ranks.sampled, ks, "sampled."),
        **summarize(ranks.full, ks, "full."),
        "users": float(ranks.sampled.size),
    }


def evaluate(
    score_all: ScoreAll,
    cases: EvalCases,
    history: SequenceCorpus,
    width: int,
    ks: Iterable[int],
    batch_size: int,
    progress: bool = False,
    description: str = "evaluate",
    exclude_history: bool = False,
) -> dict[str, float]:
    """`summarize_ranks` of `rank_cases`: HR@K, NDCG@K and MRR of `cases`, sampled and full, plus
    "users"."""
    ranks = rank_cases(score_all, cases, history, width, batch_size, exclude_history, progress, description)
    return summarize_ranks(ranks, ks)
