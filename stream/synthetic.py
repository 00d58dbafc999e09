"""A SYNTHETIC stream of behaviour events with known structure, for demos, tests and drift
experiments. It is never real data, and says so everywhere it goes: the table's schema metadata
(``casm.source = synthetic``), ids prefixed ``syn-``, ``context = {"synthetic": true}`` on the wire
(`stream.replay`), and a ``SYNTHETIC.json`` beside any file it writes.

The model (every number is a field of `SyntheticConfig`; `seed` fixes every draw):

- **Users** ``syn-u<k>`` have a latent taste: a Dirichlet(`taste_concentration`) distribution over
  `n_clusters` item clusters, and a log-normal(`user_activity_sigma`) activity weight.
- **Items** ``syn-i<k>`` belong to one cluster each, with a log-normal(`item_popularity_sigma`)
  popularity. The catalogue starts with `n_items`; a view is of a brand-new item with probability
  `new_item_rate` (the item joins a cluster drawn from the viewer's taste, popularity times
  `new_item_boost`), so new items keep appearing.
- **Views** (``pv``) arrive as a Poisson process (mean gap `mean_gap_s`, all users together): the
  viewer is drawn by activity, a cluster from the viewer's taste, an item by popularity in it.
- **Funnel**: each view leads, exclusively, to a ``cart`` (probability `cart_rate`), a ``fav``
  (`fav_rate`) or a direct ``buy`` (`direct_buy_rate`) of the same item, after an exponential delay
  (mean `follow_up_delay_s`). A cart is followed by a ``buy`` of the same item with probability
  `cart_conversion`, a fav with `fav_conversion`, after an exponential delay (mean `buy_delay_s`).
  Every delay is clipped to `horizon_s`, so "converts within the horizon" has exactly these
  probabilities. With probability `related_buy_rate` a view leads instead to a buy of another
  item of the viewed item's cluster (by popularity): a buy the window does not hold, predictable
  only from what the views teach about items.
- **Drift**: `drifts` change rates, conversions or tastes from a global event index on; e.g.
  ``{"at_event": 50000, "behaviour": "cart", "conversion": 0.0}`` makes every cart written at index
  >= 50000 never convert (the measured cart -> buy rate within the horizon drops from
  `cart_conversion` to about 0; `measured_conversion` measures it). Conversions are decided when the
  cart/fav is written, rates when the view is, tastes change at the drift's event.
  ``{"at_event": 50000, "new_cluster_items": 200}`` adds a cluster of 200 brand-new items that
  takes `new_cluster_share` of every user's taste: a new assortment takes over.

Events come out in time order (non-decreasing timestamps) with the log columns (`LOG_EVENT_SCHEMA`).
`SyntheticTruth` holds the ground truth: tastes (and their changes), item clusters, popularity and
birth events, each event's cause and trigger, and the rate/conversion schedule.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from stream.config import DriftSpec, SyntheticConfig
from stream.logs import LOG_EVENT_SCHEMA
from stream.replay import SYNTHETIC_METADATA_KEY, SYNTHETIC_METADATA_VALUE

BEHAVIOURS: tuple[str, ...] = ("pv", "cart", "fav", "buy")
"""Behaviour names of the synthetic stream (the default Taobao-like vocabulary)."""
PV, CART, FAV, BUY = range(4)

CAUSES: tuple[str, ...] = ("view", "cart", "fav", "buy_after_cart", "buy_after_fav", "direct_buy", "related_buy")
"""Why each event happened (`SyntheticTruth.cause` holds indices into this)."""
C_VIEW, C_CART, C_FAV, C_BUY_CART, C_BUY_FAV, C_DIRECT, C_RELATED = range(7)

USER_PREFIX = "syn-u"
ITEM_PREFIX = "syn-i"
MARKER_FILE = "SYNTHETIC.json"
GENERATOR = "casm-stream synthetic v1"
_RANDOM_CHUNK = 65_536
_TIME_DECIMALS = 3  # timestamps rounded to milliseconds


@dataclass
class SyntheticTruth:
    """Ground truth of a synthetic stream. Arrays index users, items (dense, in id order
    ``syn-u0..``, ``syn-i0..``) and events (table rows)."""

    config: SyntheticConfig
    user_taste: np.ndarray
    """float64 [n_users, n_clusters]: tastes at the start (rows sum to 1)."""
    taste_changes: list[tuple[int, np.ndarray, np.ndarray]]
    """(event index, users whose tastes were redrawn, their new tastes) per taste_shuffle drift."""
    item_cluster: np.ndarray
    """int64 [n_items_total]: cluster of each item."""
    item_popularity: np.ndarray
    """float64 [n_items_total]: popularity weight within its cluster."""
    item_birth_event: np.ndarray
    """int64 [n_items_total]: event index of an item's first view; -1 for the starting catalogue."""
    cause: np.ndarray
    """int8 [n_events]: index into CAUSES."""
    trigger: np.ndarray
    """int64 [n_events]: event index of the view / cart / fav that caused this event; -1 for views."""

    def taste_at(self, event_index: int) -> np.ndarray:
        """Users' tastes in force at `event_index`."""
        taste = self.user_taste.copy()
        for at, users, new in self.taste_changes:
            if at <= event_index:
                if new.shape[1] > taste.shape[1]:  # a new cluster appeared
                    taste = np.pad(taste, ((0, 0), (0, new.shape[1] - taste.shape[1])))
                taste[users] = new
        return taste

    def rate_at(self, behaviour: str, event_index: int) -> float:
        """P(`behaviour` | view) for views written at `event_index` (behaviour: cart, fav, buy)."""
        base = {"cart": self.config.cart_rate, "fav": self.config.fav_rate, "buy": self.config.direct_buy_rate}
        value = base[behaviour]
        for drift in sorted(self.config.drifts, key=lambda d: d.at_event):
            if drift.at_event <= event_index and drift.behaviour == behaviour and drift.rate is not None:
                value = drift.rate
        return value

    def conversion_at(self, behaviour: str, event_index: int) -> float:
        """P(buy within horizon | `behaviour`) for carts / favs written at `event_index`."""
        value = {"cart": self.config.cart_conversion, "fav": self.config.fav_conversion}[behaviour]
        for drift in sorted(self.config.drifts, key=lambda d: d.at_event):
            if drift.at_event <= event_index and drift.behaviour == behaviour and drift.conversion is not None:
                value = drift.conversion
        return value

    def summary(self) -> dict[str, Any]:
        """JSON-able description: the configuration, sizes and counts per cause."""
        counts = np.bincount(self.cause, minlength=len(CAUSES))
        return {
            "synthetic": True,
            "generator": GENERATOR,
            "config": self.config.model_dump(mode="json"),
            "n_items_total": int(self.item_cluster.size),
            "n_new_items": int((self.item_birth_event >= 0).sum()),
            "events_by_cause": {name: int(c) for name, c in zip(CAUSES, counts, strict=True)},
        }


@dataclass
class SyntheticStream:
    """Synthetic events (log columns, time order, labelled synthetic) and their ground truth."""

    events: pa.Table
    truth: SyntheticTruth
    source_name: str = field(default="synthetic")

    def write(self, directory: str | Path) -> Path:
        """Write ``events.csv.gz`` (the generic log format plus a ``source`` column that says
        synthetic; ``read_log(directory, "generic")`` reads it) and ``SYNTHETIC.json`` (the ground
        truth summary). Returns the CSV path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "events.csv.gz"
        table = self.events.append_column(
            "source", pa.array(["synthetic"] * self.events.num_rows, pa.string())
        ).replace_schema_metadata(None)
        with pa.CompressedOutputStream(str(path), "gzip") as out:
            pacsv.write_csv(table, out, pacsv.WriteOptions(quoting_style="needed"))
        (directory / MARKER_FILE).write_text(
            json.dumps({**self.truth.summary(), "source_name": self.source_name}, indent=2) + "\n"
        )
        return path


def is_synthetic_log(path: str | Path) -> bool:
    """Whether a log file (or its folder) was written by `SyntheticStream.write`."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("synthetic"))
    except (OSError, ValueError):
        return False


class _Uniforms:
    """Uniform(0, 1) draws in chunks (one numpy call per chunk, not per event)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self._iter: Iterator[float] = iter(())

    def __call__(self) -> float:
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.rng.random(_RANDOM_CHUNK).tolist())
            return next(self._iter)


def _exp_delay(u: float, mean: float, horizon: float) -> float:
    """Exponential(mean) from uniform `u`, clipped to `horizon`."""
    return min(horizon, -mean * math.log1p(-u)) if mean > 0 else 0.0


def generate(config: SyntheticConfig | None = None) -> SyntheticStream:
    """The synthetic stream of `config` (see the module docstring). Deterministic in the config."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    n_users, n_clusters = cfg.n_users, cfg.n_clusters

    taste = rng.dirichlet(np.full(n_clusters, cfg.taste_concentration), size=n_users)
    start_taste = taste.copy()
    taste_cum = np.cumsum(taste, axis=1).tolist()
    activity = rng.lognormal(0.0, cfg.user_activity_sigma, n_users) if cfg.user_activity_sigma else np.ones(n_users)
    activity_cum = np.cumsum(activity / activity.sum()).tolist()

    item_cluster: list[int] = rng.integers(0, n_clusters, cfg.n_items).tolist()
    popularity: list[float] = (
        rng.lognormal(0.0, cfg.item_popularity_sigma, cfg.n_items)
        if cfg.item_popularity_sigma
        else np.ones(cfg.n_items)
    ).tolist()
    birth: list[int] = [-1] * cfg.n_items
    cluster_items: list[list[int]] = [[] for _ in range(n_clusters)]
    cluster_cum: list[list[float]] = [[] for _ in range(n_clusters)]
    for item, cluster in enumerate(item_cluster):
        cluster_items[cluster].append(item)
        previous = cluster_cum[cluster][-1] if cluster_cum[cluster] else 0.0
        cluster_cum[cluster].append(previous + popularity[item])

    uniform = _Uniforms(rng)
    rates = {CART: cfg.cart_rate, FAV: cfg.fav_rate, BUY: cfg.direct_buy_rate}
    conversion = {CART: cfg.cart_conversion, FAV: cfg.fav_conversion}
    drifts: list[DriftSpec] = sorted(cfg.drifts, key=lambda d: d.at_event)
    taste_changes: list[tuple[int, np.ndarray, np.ndarray]] = []
    code = {"cart": CART, "fav": FAV, "buy": BUY}

    def born(cluster: int, weight: float, index: int) -> int:
        """A brand-new item of `cluster` with popularity `weight`, born at event `index`."""
        item = len(item_cluster)
        item_cluster.append(cluster)
        popularity.append(weight)
        birth.append(index)
        cluster_items[cluster].append(item)
        previous = cluster_cum[cluster][-1] if cluster_cum[cluster] else 0.0
        cluster_cum[cluster].append(previous + weight)
        return item

    def new_cluster(drift: DriftSpec, index: int) -> None:
        """A cluster of fresh items that takes `new_cluster_share` of every user's taste."""
        nonlocal taste, n_clusters
        cluster = n_clusters
        n_clusters += 1
        cluster_items.append([])
        cluster_cum.append([])
        for _ in range(int(drift.new_cluster_items)):
            born(cluster, float(rng.lognormal(0.0, cfg.item_popularity_sigma)), index)
        share = drift.new_cluster_share
        taste = np.concatenate([taste * (1.0 - share), np.full((n_users, 1), share)], axis=1)
        taste_cum[:] = np.cumsum(taste, axis=1).tolist()
        taste_changes.append((index, np.arange(n_users), taste.copy()))

    def apply(drift: DriftSpec, index: int) -> None:
        if drift.behaviour is not None and drift.rate is not None:
            rates[code[drift.behaviour]] = drift.rate
            if sum(rates.values()) > 1.0:
                raise ValueError(f"drift at event {index} makes cart+fav+buy rates exceed 1: {rates}")
        if drift.behaviour is not None and drift.conversion is not None:
            conversion[code[drift.behaviour]] = drift.conversion
        if drift.new_cluster_items:
            new_cluster(drift, index)
        if drift.taste_shuffle:
            count = int(round(drift.taste_shuffle * n_users))
            users = np.sort(rng.choice(n_users, size=count, replace=False))
            new = rng.dirichlet(np.full(n_clusters, cfg.taste_concentration), size=count)
            taste[users] = new
            for user, row in zip(users.tolist(), np.cumsum(new, axis=1).tolist(), strict=True):
                taste_cum[user] = row
            taste_changes.append((index, users, new))

    out_user: list[int] = []
    out_item: list[int] = []
    out_behaviour: list[int] = []
    out_time: list[float] = []
    out_cause: list[int] = []
    out_trigger: list[int] = []
    # Scheduled follow-ups: (time, sequence number, behaviour, cause, user, item, trigger index).
    pending: list[tuple[float, int, int, int, int, int, int]] = []
    sequence = 0
    horizon = cfg.horizon_s
    next_view = cfg.start_timestamp
    drift_pos = 0
    index = 0
    while index < cfg.n_events:
        while drift_pos < len(drifts) and drifts[drift_pos].at_event <= index:
            apply(drifts[drift_pos], index)
            drift_pos += 1
        if pending and pending[0][0] <= next_view:
            when, _, behaviour, cause, user, item, trigger = heapq.heappop(pending)
            if behaviour in (CART, FAV) and uniform() < conversion[behaviour]:
                delay = _exp_delay(uniform(), cfg.buy_delay_s, horizon)
                sequence += 1
                follow = C_BUY_CART if behaviour == CART else C_BUY_FAV
                heapq.heappush(pending, (when + delay, sequence, BUY, follow, user, item, index))
        else:
            when, behaviour, cause, trigger = next_view, PV, C_VIEW, -1
            user = min(bisect.bisect_right(activity_cum, uniform()), n_users - 1)
            row = taste_cum[user]
            cluster = min(bisect.bisect_right(row, uniform() * row[-1]), n_clusters - 1)
            if uniform() < cfg.new_item_rate or not cluster_items[cluster]:
                item = born(cluster, float(rng.lognormal(0.0, cfg.item_popularity_sigma)) * cfg.new_item_boost, index)
            else:
                cum = cluster_cum[cluster]
                position = min(bisect.bisect_right(cum, uniform() * cum[-1]), len(cum) - 1)
                item = cluster_items[cluster][position]
            draw = uniform()
            follow_up, follow_item = -1, item
            if draw < rates[CART]:
                follow_up, follow_cause = CART, C_CART
            elif draw < rates[CART] + rates[FAV]:
                follow_up, follow_cause = FAV, C_FAV
            elif draw < rates[CART] + rates[FAV] + rates[BUY]:
                follow_up, follow_cause = BUY, C_DIRECT
            elif draw < rates[CART] + rates[FAV] + rates[BUY] + cfg.related_buy_rate:
                # A buy of another item of the viewed item's cluster (compared, then bought).
                follow_up, follow_cause = BUY, C_RELATED
                own = item_cluster[item]
                cum = cluster_cum[own]
                position = min(bisect.bisect_right(cum, uniform() * cum[-1]), len(cum) - 1)
                follow_item = cluster_items[own][position]
            if follow_up >= 0:
                delay = _exp_delay(uniform(), cfg.follow_up_delay_s, horizon)
                sequence += 1
                heapq.heappush(pending, (when + delay, sequence, follow_up, follow_cause, user, follow_item, index))
            next_view = when + _exp_delay(uniform(), cfg.mean_gap_s, math.inf)
        out_user.append(user)
        out_item.append(item)
        out_behaviour.append(behaviour)
        out_time.append(when)
        out_cause.append(cause)
        out_trigger.append(trigger)
        index += 1

    times = np.round(np.asarray(out_time, dtype=np.float64), _TIME_DECIMALS)
    user_names = pa.array([f"{USER_PREFIX}{k}" for k in range(n_users)], pa.string())
    item_names = pa.array([f"{ITEM_PREFIX}{k}" for k in range(len(item_cluster))], pa.string())
    table = pa.Table.from_arrays(
        [
            user_names.take(pa.array(out_user, pa.int64())),
            item_names.take(pa.array(out_item, pa.int64())),
            pa.array(BEHAVIOURS, pa.string()).take(pa.array(out_behaviour, pa.int64())),
            pa.array(times, pa.float64()),
        ],
        schema=LOG_EVENT_SCHEMA.with_metadata(
            {
                SYNTHETIC_METADATA_KEY: SYNTHETIC_METADATA_VALUE,
                b"casm.generator": GENERATOR.encode(),
                b"casm.synthetic_seed": str(cfg.seed).encode(),
            }
        ),
    )
    truth = SyntheticTruth(
        config=cfg,
        user_taste=start_taste,
        taste_changes=taste_changes,
        item_cluster=np.asarray(item_cluster, dtype=np.int64),
        item_popularity=np.asarray(popularity, dtype=np.float64),
        item_birth_event=np.asarray(birth, dtype=np.int64),
        cause=np.asarray(out_cause, dtype=np.int8),
        trigger=np.asarray(out_trigger, dtype=np.int64),
    )
    return SyntheticStream(table, truth, source_name=f"synthetic-seed{cfg.seed}")


def measured_conversion(
    events: pa.Table,
    trigger: str = "cart",
    horizon_s: float = SyntheticConfig.model_fields["horizon_s"].default,
    start: int = 0,
    stop: int | None = None,
    target: str = "buy",
) -> tuple[float, int]:
    """The fraction of `trigger` events with row index in [start, stop) that are followed by a
    `target` event of the same user and item within `horizon_s` seconds, and how many triggers
    were counted. Triggers later than the last event time minus the horizon are left out (their
    outcome is not observed yet). Works on any event table, synthetic or real."""
    users = events.column("user_id").to_pylist()
    items = events.column("item_id").to_pylist()
    behaviours = events.column("behavior").to_pylist()
    times = events.column("timestamp").to_pylist()
    if not times:
        return math.nan, 0
    targets: dict[tuple[str, str], list[float]] = defaultdict(list)
    for user, item, behaviour, ts in zip(users, items, behaviours, times, strict=True):
        if behaviour == target:
            targets[(user, item)].append(ts)
    last_observed = times[-1] - horizon_s
    stop = len(times) if stop is None else min(stop, len(times))
    hits = counted = 0
    for row in range(start, stop):
        if behaviours[row] != trigger or times[row] > last_observed:
            continue
        counted += 1
        follow = targets.get((users[row], items[row]))
        if follow:
            position = bisect.bisect_left(follow, times[row])
            if position < len(follow) and follow[position] - times[row] <= horizon_s:
                hits += 1
    return (hits / counted if counted else math.nan), counted
