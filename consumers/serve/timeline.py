"""The dashboard's history of `casm serve`: a bounded in-memory timeline of its metrics.

A `Timeline` samples the service's metrics (`consumers.telemetry.ServiceMetrics`, read through
prometheus_client's `collect()`) and the published-HR tracker (`published_hits`) every
`serve.timeline_every_s` seconds, on a thread of its own, and keeps the last
`serve.timeline_points` samples of every series in deques with that maxlen: fixed memory however
long the service runs. Keyed series (lag per partition, alpha and loss per behaviour, dead letters
per reason) are bounded by the number of partitions, behaviours and reasons.

Why a thread of its own rather than the polling loop: the loop can stay in one call for long
(a rebalance with its restore, the deterministic lockstep, a held-back batch), and the history
should keep its period whatever the loop does; the sampler reads only thread-safe values
(prometheus_client's metrics, the tracker under its lock, the producer's counts).

`to_json()` (served as ``GET /api/timeline``; ``GET /api/timeline?since=T`` returns only the
points and drifts after unix time T, so that a client polling faster than the samples come
fetches each point once: pass the previous answer's ``now``) returns::

    {
      "every_s": 5.0,               # sampling period (s)
      "points": 720,                # samples kept per series at most
      "now": 1720000000.0,          # unix s of the newest sample (null before the first)
      "since": null,                # the request's T (null: the whole history)
      "series": {                   # each a list of [t (unix s), value or null], oldest first
        "events_per_s": [...],              # events applied per second over the interval
        "freshness_p50_s": [...],           # produce -> list sent, median over the interval (s)
        "freshness_p99_s": [...],           # ... its 99th percentile (s); null: no list sent
        "model_version": [...],
        "trainer_steps_per_s": [...],
        "outputs_acknowledged": [...],      # recommendations acknowledged by the broker (total)
        "outputs_failed": [...],            # recommendation sends failed + given up (total)
        "hr_published": [...],              # HR@K of the lists this service published, over the
        "hr_popularity": [...],             #   interval's target events; of popularity's lists beside them
        "hr_events": [...]                  # target events those rates are over (interval)
      },
      "keyed": {                    # name -> key -> a series as above
        "lag": {"<topic>[<partition>]": [...]},          # records behind the high watermark
        "alpha": {"<behaviour>": [...]},                 # alpha_b of the weighted BCE
        "train_loss": {"<behaviour>": [...]},            # mean loss of the newest version
        "dead_letters": {"<reason>": [...]}              # dead letters sent (total)
      },
      "drifts": [[t, "<behaviour>", n], ...],   # drift detections in the interval ending at t
      "freshness_histogram": {"le": [0.005, ..., null], "count": [...]}
                                    # cumulative since start, per bucket (not cumulative over
                                    # buckets); le null is +Inf
    }

Its size depends only on `points` and the number of series (with ``since``: on the samples taken
after T; the histogram is always whole).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from consumers.serve.published_hits import HitTotals, PublishedHits
from consumers.telemetry import ServiceMetrics

log = logging.getLogger(__name__)

FRESHNESS_QUANTILES = {"freshness_p50_s": 0.5, "freshness_p99_s": 0.99}
SERIES = ("events_per_s", *FRESHNESS_QUANTILES, "model_version", "trainer_steps_per_s", "outputs_acknowledged",
          "outputs_failed", "hr_published", "hr_popularity", "hr_events")
KEYED = ("lag", "alpha", "train_loss", "dead_letters")
DIGITS = 6  # decimals of the values in the JSON: a bounded, readable payload
TIME_DIGITS = 3  # decimals of the times (unix s): milliseconds
STOP_WAIT_S = 5.0  # longest wait for the sampler thread at stop (one sample takes milliseconds)

Point = tuple[float, float | None]


def samples(metric: Any, suffix: str = "") -> list[Any]:
    """The prometheus_client samples of `metric` (all label sets) whose name ends with `suffix`."""
    return [s for family in metric.collect() for s in family.samples if s.name.endswith(suffix)]


def total(metric: Any, suffix: str = "") -> float:
    """Sum of `metric`'s samples ending with `suffix` (``_total`` for a counter's value)."""
    return float(sum(s.value for s in samples(metric, suffix)))


def by_label(metric: Any, label: str, suffix: str = "") -> dict[str, float]:
    """`metric`'s values summed by the value of `label` (samples ending with `suffix`)."""
    values: dict[str, float] = {}
    for s in samples(metric, suffix):
        key = s.labels.get(label, "")
        values[key] = values.get(key, 0.0) + float(s.value)
    return values


def histogram_buckets(metric: Any) -> tuple[list[float], list[float]]:
    """A histogram's bucket upper bounds (s, the last +inf) and cumulative counts, in order."""
    rows = sorted((float(s.labels["le"]), float(s.value)) for s in samples(metric, "_bucket"))
    return [b for b, _ in rows], [c for _, c in rows]


def histogram_quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """The `q` quantile (0..1) of observations counted in buckets with upper `bounds` and
    `cumulative` counts (Prometheus' layout; the last bound +inf), interpolated linearly within
    the bucket (from 0 in the first); the last finite bound when it falls in the +inf bucket.
    None when nothing was observed."""
    if not cumulative or cumulative[-1] <= 0:
        return None
    rank = q * cumulative[-1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = (lower_bound if math.isinf(bound) else bound), count
    return lower_bound


def _rounded(value: float | None, digits: int = DIGITS) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


class Timeline:
    """The last `points` samples of the service's series, taken every `every_s` seconds."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        every_s: float,
        points: int,
        outputs_topic: str,
        hits: PublishedHits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if every_s <= 0 or points < 2:
            raise ValueError(f"every_s must be > 0 and points >= 2, not {every_s} and {points}")
        self.metrics = metrics
        self.every_s = every_s
        self.points = points
        self.outputs_topic = outputs_topic
        self.hits = hits
        self.clock = clock
        self._lock = threading.Lock()
        self._series: dict[str, deque[Point]] = {name: deque(maxlen=points) for name in SERIES}
        self._keyed: dict[str, dict[str, deque[Point]]] = {name: {} for name in KEYED}
        self._drifts: deque[tuple[float, str, int]] = deque(maxlen=points)
        self._histogram: tuple[list[float], list[float]] = ([], [])
        self._now: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = self._read()  # the baseline of the first interval
        self._previous_at = clock()

    # ----------------------------------------------------------------------------- reading
    def _read(self) -> dict[str, Any]:
        """The cumulative values the next interval's deltas are taken against."""
        m = self.metrics
        bounds, cumulative = histogram_buckets(m.freshness)
        return {
            "events": total(m.events, "_total"),
            "bounds": bounds,
            "freshness": cumulative,
            "drifts": by_label(m.drifts, "behaviour", "_total"),
            "hits": self.hits.totals() if self.hits is not None else HitTotals(),
        }

    def sample(self, now: float | None = None) -> None:
        """Take one sample at unix time `now` (s; the clock by default)."""
        now = self.clock() if now is None else now
        current = self._read()
        m = self.metrics
        with self._lock:
            previous, dt = self._previous, max(now - self._previous_at, 1e-9)
            self._previous, self._previous_at, self._now = current, now, now
            add = self._append
            add(self._series["events_per_s"], now, (current["events"] - previous["events"]) / dt)
            delta = [c - p for c, p in zip(current["freshness"], previous["freshness"], strict=False)]
            for name, q in FRESHNESS_QUANTILES.items():
                add(self._series[name], now, histogram_quantile(q, current["bounds"], delta))
            self._histogram = (current["bounds"], current["freshness"])
            add(self._series["model_version"], now, total(m.model_version))
            add(self._series["trainer_steps_per_s"], now, total(m.trainer_steps_per_s))
            stats = m.delivery_stats()
            topic = self.outputs_topic
            add(self._series["outputs_acknowledged"], now, float(stats.get("acknowledged", {}).get(topic, 0)))
            add(self._series["outputs_failed"], now, float(stats.get("failed", {}).get(topic, 0)
                                                          + stats.get("given_up", {}).get(topic, 0)))
            hits, before = current["hits"], previous["hits"]
            counted = hits.counted - before.counted
            add(self._series["hr_published"], now, (hits.hits - before.hits) / counted if counted else None)
            add(self._series["hr_popularity"], now,
                (hits.popular_hits - before.popular_hits) / counted if counted else None)
            add(self._series["hr_events"], now, float(counted))
            lag = {f"{s.labels['topic']}[{s.labels['partition']}]": s.value for s in samples(m.lag)}
            for name, values in (("lag", lag), ("alpha", by_label(m.alpha, "behaviour")),
                                 ("train_loss", by_label(m.train_loss_by_behaviour, "behaviour")),
                                 ("dead_letters", by_label(m.dead_letters, "kind", "_total"))):
                group = self._keyed[name]
                for key, value in values.items():
                    add(group.setdefault(key, deque(maxlen=self.points)), now, value)
            for behaviour, count in current["drifts"].items():
                detected = int(round(count - previous["drifts"].get(behaviour, 0.0)))
                if detected > 0:
                    self._drifts.append((now, behaviour, detected))

    @staticmethod
    def _append(series: deque[Point], now: float, value: float | None) -> None:
        series.append((now, value))

    # ----------------------------------------------------------------------------- output
    def to_json(self, since: float | None = None) -> dict[str, Any]:
        """The history in the schema of the module docstring (plain values, JSON-ready); with
        `since` (unix s, as an answer's ``now``) only the points and drifts after it."""
        after = -math.inf if since is None else since

        def points(series: deque[Point]) -> list[list[float | None]]:
            return [[at, _rounded(v)] for t, v in series if (at := _rounded(t, TIME_DIGITS)) > after]

        with self._lock:
            bounds, cumulative = self._histogram
            per_bucket = [c - p for c, p in zip(cumulative, [0.0, *cumulative], strict=False)]
            return {
                "every_s": self.every_s,
                "points": self.points,
                "now": _rounded(self._now, TIME_DIGITS),
                "series": {name: points(series) for name, series in self._series.items()},
                "keyed": {name: {key: points(series) for key, series in sorted(group.items())}
                          for name, group in self._keyed.items()},
                "since": since,
                "drifts": [[at, behaviour, n] for t, behaviour, n in self._drifts
                           if (at := _rounded(t, TIME_DIGITS)) > after],
                "freshness_histogram": {"le": [_rounded(b) for b in bounds], "count": per_bucket},
            }

    # ----------------------------------------------------------------------------- thread
    def start(self) -> Timeline:
        """Sample every `every_s` seconds on a thread of its own until `stop()`."""
        self._thread = threading.Thread(target=self._loop, name="casm-timeline", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the dashboard's history is for operators; serving goes on
                log.exception("could not sample the timeline")

    def stop(self) -> None:
        """Stop the sampler thread (if started)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
