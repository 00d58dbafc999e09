"""Drift of behaviour usefulness, detected with River on the live stream, and the re-weighting of
alpha_b it triggers.

Signals per behaviour b (test-then-train: computed before the model learns the event):

- ``hit``: 1 when the model ranked the item of a b-event in its top K for that user, else 0
  (the model's current grip on b-events).
- ``conversion``: 1 when a b-event on an item is followed, within the horizon H of event time, by
  the target behaviour on the same item by the same user, else 0 (b's current conversion).

One River detector per (signal, behaviour): ADWIN by default, PageHinkley or KSWIN by setting.
After a detection the detector is replaced by a fresh one (River's ADWIN otherwise tends to report
the same change several times) and ignores further input for a cooldown of updates.

The default policy, ``conversion``: a detection on behaviour b (either signal, b not the target)
opens a re-estimate. Once `settle_outcomes` conversion outcomes of b have been observed *after*
the detection, alpha_b moves towards ``alpha_target * conversion_b`` (the post-detection
conversion rate), clipped to [alpha_min, alpha_max] and smoothed:
``alpha_b += smoothing * (raw - alpha_b)``. Why: alpha_b says how much predicting b-events should
teach a model whose job is the target; a b-event is worth what it converts to the target, and the
target itself, which converts to itself, keeps its configured weight. Waiting for post-detection
outcomes keeps the pre-drift regime out of the estimate. The ``fixed`` policy never changes alpha.

The ``gradient`` policy (after Du et al. 2018, "Adapting Auxiliary Losses Using Gradient
Similarity"): the trainer measures, on one batch of its replay buffer, the cosine similarity
cos_b between the gradient of behaviour b's loss (the unweighted BCE at positions whose next event
is b) and the gradient of the target's loss, over every trainable weight. Then
``raw = alpha_target * max(0, cos_b)``, clipped to [alpha_min, alpha_max], and
``alpha_b += gradient_smoothing * (raw - alpha_b)``. Measured every `gradient_every_steps`
trainer steps and as soon as a detector fires. Why: an auxiliary behaviour's loss helps the
target exactly as far as its gradient points the same way; when a drift makes b's events stop
agreeing with the target's (carts that no longer convert), cos_b falls and so does alpha_b.
Cost: one forward and one backward pass per behaviour present in the batch (about
1 + num_behaviours / 2 training steps), per measurement.
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from river import drift as river_drift

from consumers.settings import DriftConfig

log = logging.getLogger(__name__)

ALPHA_TOLERANCE = 1e-3
"""Smaller re-weightings are not made (nor recorded): they change no ranking measurably."""

def make_detector(cfg: DriftConfig):
    """A fresh River detector as configured."""
    if cfg.detector == "adwin":
        return river_drift.ADWIN(delta=cfg.adwin_delta, clock=cfg.adwin_clock, grace_period=cfg.adwin_grace_period)
    if cfg.detector == "page_hinkley":
        return river_drift.PageHinkley(
            min_instances=cfg.ph_min_instances, delta=cfg.ph_delta, threshold=cfg.ph_threshold, alpha=cfg.ph_alpha
        )
    return river_drift.KSWIN(
        alpha=cfg.kswin_alpha, window_size=cfg.kswin_window_size, stat_size=cfg.kswin_stat_size, seed=cfg.seed
    )


@dataclass
class Detection:
    """A detector fired: which signal of which behaviour, after how many of its updates."""

    signal: str
    behaviour: str
    detector: str
    update: int
    value: float


class DetectorBank:
    """One detector per (signal, behaviour), with reset after a detection and a cooldown."""

    def __init__(self, cfg: DriftConfig) -> None:
        self.cfg = cfg
        self._detectors: dict[tuple[str, str], object] = {}
        self._updates: dict[tuple[str, str], int] = defaultdict(int)
        self._quiet_until: dict[tuple[str, str], int] = defaultdict(int)

    def update(self, signal: str, behaviour: str, value: float) -> Detection | None:
        key = (signal, behaviour)
        detector = self._detectors.get(key)
        if detector is None:
            detector = self._detectors[key] = make_detector(self.cfg)
        self._updates[key] += 1
        count = self._updates[key]
        if count <= self._quiet_until[key]:
            return None
        detector.update(value)
        if not detector.drift_detected:
            return None
        self._detectors[key] = make_detector(self.cfg)
        self._quiet_until[key] = count + self.cfg.cooldown_updates
        return Detection(signal, behaviour, self.cfg.detector, count, float(value))

    def updates(self, signal: str, behaviour: str) -> int:
        return self._updates[(signal, behaviour)]


def _minus_infinity() -> float:  # a named default factory: the tracker must pickle (saved state)
    return float("-inf")


class ConversionTracker:
    """Resolves each non-target event (user, item, b, time) to 1 when the target on the same
    (user, item) follows within `horizon_s` of event time, else 0.

    Every outcome is released when its horizon has passed, in the order of the events' times, so
    the outcome stream is not biased by resolution order (conversions are known early, misses only
    at the horizon: releasing the ones early would make a stationary stream look drifting).
    Time is kept per partition: a user's events share one partition, which Kafka delivers in
    order, while different partitions may be consumed far apart in event time."""

    def __init__(self, target: str, horizon_s: float, max_pending_per_key: int) -> None:
        self.target = target
        self.horizon_s = horizon_s
        self.max_pending = max_pending_per_key
        self._queues: dict[int, list[list]] = defaultdict(list)  # partition -> heap of entries
        self._now: dict[int, float] = defaultdict(_minus_infinity)
        self._open: dict[tuple[str, str], list[list]] = {}
        self._stale = 0  # released entries still listed in _open
        self._seq = 0

    def observe(
        self, user: str, item: str, behaviour: str, timestamp: float, partition: int = 0
    ) -> list[tuple[str, int]]:
        """Feed one event (in its partition's order); returns the outcomes whose horizon passed."""
        self._now[partition] = max(self._now[partition], timestamp)
        key = (user, item)
        if behaviour == self.target:
            for entry in self._open.pop(key, []):
                if timestamp - entry[0] <= self.horizon_s:
                    entry[3] = True
        else:
            entries = self._open.setdefault(key, [])
            if len(entries) >= self.max_pending:
                entries.pop(0)  # still released (as a miss unless converted) at its horizon
            entry = [timestamp, self._seq, behaviour, False, False]  # ..., converted, released
            self._seq += 1
            entries.append(entry)
            heapq.heappush(self._queues[partition], entry)
        return self._release(partition)

    def _release(self, partition: int) -> list[tuple[str, int]]:
        released = []
        queue, now = self._queues[partition], self._now[partition]
        while queue and queue[0][0] + self.horizon_s < now:
            entry = heapq.heappop(queue)
            entry[4] = True
            released.append((entry[2], int(entry[3])))
        self._stale += len(released)
        if self._stale > len(self._open) + 1024:  # amortised: forget released entries
            self._open = {k: kept for k, v in self._open.items() if (kept := [e for e in v if not e[4]])}
            self._stale = 0
        return released

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values())


@dataclass
class AlphaChange:
    """A re-weighting decided by the policy: after `detection`, or on a scheduled measurement
    (detection None). `estimate` is what the policy measured (a conversion rate, a cosine)."""

    behaviour: str
    old: float
    new: float
    estimate: float
    detection: Detection | None
    basis: str = "conversion"


class AlphaPolicy(Protocol):
    """Decides alpha_b after a detection, from post-detection conversion outcomes or from the
    trainer's gradient similarities."""

    measures_gradients: bool

    def on_detection(self, detection: Detection) -> None: ...

    def on_outcome(self, behaviour: str, outcome: int, alpha: Mapping[str, float]) -> AlphaChange | None: ...

    def on_similarity(self, similarity: Mapping[str, float], alpha: Mapping[str, float]) -> list[AlphaChange]: ...


class FixedPolicy:
    """Never changes alpha (the baseline the adaptive policy is compared with)."""

    measures_gradients = False

    def on_detection(self, detection: Detection) -> None:
        return None

    def on_outcome(self, behaviour: str, outcome: int, alpha: Mapping[str, float]) -> AlphaChange | None:
        return None

    def on_similarity(self, similarity: Mapping[str, float], alpha: Mapping[str, float]) -> list[AlphaChange]:
        return []


class GradientSimilarityPolicy(FixedPolicy):
    """alpha_b from the cosine of b's loss gradient with the target's (module docstring)."""

    measures_gradients = True

    def __init__(self, cfg: DriftConfig, target: str) -> None:
        self.cfg = cfg
        self.target = target
        self._last_detection: Detection | None = None

    def on_detection(self, detection: Detection) -> None:
        self._last_detection = detection

    def on_similarity(self, similarity: Mapping[str, float], alpha: Mapping[str, float]) -> list[AlphaChange]:
        detection, self._last_detection = self._last_detection, None
        changes = []
        for behaviour, cosine in sorted(similarity.items()):
            if behaviour == self.target or behaviour not in alpha:
                continue
            raw = min(max(alpha[self.target] * max(0.0, cosine), self.cfg.alpha_min), self.cfg.alpha_max)
            old = alpha[behaviour]
            new = old + self.cfg.gradient_smoothing * (raw - old)
            if abs(new - old) >= ALPHA_TOLERANCE:  # no history rows for smoothing's last digits
                changes.append(AlphaChange(behaviour, old, new, float(cosine), detection, "gradient"))
        return changes


class ConversionPolicy(FixedPolicy):
    """After a detection on b, alpha_b -> alpha_target * (b's post-detection conversion), clipped
    and smoothed (see the module docstring)."""

    def __init__(self, cfg: DriftConfig, target: str) -> None:
        self.cfg = cfg
        self.target = target
        self._open: dict[str, tuple[Detection, list[int]]] = {}

    def on_detection(self, detection: Detection) -> None:
        if detection.behaviour != self.target:
            self._open[detection.behaviour] = (detection, [])

    def on_outcome(self, behaviour: str, outcome: int, alpha: Mapping[str, float]) -> AlphaChange | None:
        opened = self._open.get(behaviour)
        if opened is None:
            return None
        detection, outcomes = opened
        outcomes.append(outcome)
        if len(outcomes) < self.cfg.settle_outcomes:
            return None
        del self._open[behaviour]
        estimate = sum(outcomes) / len(outcomes)
        raw = min(max(alpha[self.target] * estimate, self.cfg.alpha_min), self.cfg.alpha_max)
        old = alpha[behaviour]
        new = old + self.cfg.smoothing * (raw - old)
        return AlphaChange(behaviour, old, new, estimate, detection)


def make_policy(cfg: DriftConfig, target: str) -> AlphaPolicy:
    if cfg.policy == "conversion":
        return ConversionPolicy(cfg, target)
    if cfg.policy == "gradient":
        return GradientSimilarityPolicy(cfg, target)
    return FixedPolicy()


class DriftMonitor:
    """Feeds both signals to the detectors and the conversion outcomes to the policy; returns the
    detections and alpha changes of each batch."""

    def __init__(self, cfg: DriftConfig, target: str) -> None:
        self.cfg = cfg
        self.target = target
        self.detectors = DetectorBank(cfg)
        self.conversion = ConversionTracker(target, cfg.horizon_s, cfg.max_pending_per_user_item)
        self.policy = make_policy(cfg, target)
        self.detections: list[Detection] = []

    def _detect(self, signal: str, behaviour: str, value: float, found: list[Detection]) -> None:
        if signal not in self.cfg.signals:
            return
        detection = self.detectors.update(signal, behaviour, value)
        if detection is not None:
            found.append(detection)
            self.detections.append(detection)
            self.policy.on_detection(detection)
            log.info("drift detected on %s of %s by %s after %d updates",
                     signal, behaviour, detection.detector, detection.update)

    def observe(
        self,
        hits: Iterable[tuple[str, int]],
        events: Iterable[tuple[str, str, str, float, int]],
        alpha: Mapping[str, float],
    ) -> tuple[list[Detection], list[AlphaChange]]:
        """hits: (behaviour, 0/1) of scored events; events: (user, item, behaviour, timestamp,
        partition) in arrival order. Returns this batch's detections and alpha changes (applied to
        a copy of `alpha` in order, so several changes compose)."""
        found: list[Detection] = []
        changes: list[AlphaChange] = []
        current = dict(alpha)
        for behaviour, hit in hits:
            self._detect("hit", behaviour, float(hit), found)
        for user, item, behaviour, timestamp, partition in events:
            for b, outcome in self.conversion.observe(user, item, behaviour, timestamp, partition):
                self._detect("conversion", b, float(outcome), found)
                change = self.policy.on_outcome(b, outcome, current)
                if change is not None:
                    current[b] = change.new
                    changes.append(change)
        return found, changes
