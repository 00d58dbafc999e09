"""Scale-out status: each `casm serve` instance publishes what it is doing to `topics.status`, and
`casm status` reads the topic back and shows one row per instance.

An instance's record (`InstanceStatus`, JSON, keyed by its instance id) says its role, the
partitions it holds, its lag per partition, the model version it serves and when that version was
published and swapped in, how many events it applied, and whether it is running or stopped. A
`StatusReporter` sends one every `scale.status_every_s` from the service loop and a last one with
state ``stopped`` on shutdown; status is best-effort: a failed send is logged, never raised.
`read_status` reads the topic from its beginning to its high watermark without joining a group and
keeps each instance's newest record; `format_status` makes the table and checks that the running
ingest instances serve one model version and hold disjoint partitions.

All times are unix seconds (wall clock, ``time.time()``) unless a name says monotonic.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from consumers.settings import CasmSettings
from stream.clients import read_topic
from stream.config import KafkaConfig
from stream.delivery import AcknowledgedProducer, Outcome

log = logging.getLogger(__name__)

RUNNING = "running"
STOPPED = "stopped"
STALE = "stale"
"""Shown (never published) for a running instance whose newest record is older than the limit."""
STATES = (RUNNING, STOPPED)
INGEST_ROLES = ("ingest",)
"""Roles whose partitions are `behaviours` partitions and whose model versions must agree."""
PARTITION_ROLES = ("all", "ingest")
"""Roles that hold `behaviours` partitions (the trainer's are changelog partitions)."""
KEY_ENCODING = "utf-8"


def lag_key(topic: str, partition: int) -> str:
    """The key of one partition in `InstanceStatus.lag`: ``"topic[p]"``."""
    return f"{topic}[{partition}]"


def lag_by_key(lag: Mapping[Any, int | None]) -> dict[str, int]:
    """``stream.clients.lag(consumer)`` ({TopicPartition: records behind or None}) as
    `InstanceStatus.lag`; partitions with no fetch answered yet (None) are left out."""
    return {lag_key(tp.topic, tp.partition): int(n) for tp, n in sorted(lag.items()) if n is not None}


@dataclass
class InstanceStatus:
    """One instance's status record.

    `partitions` are the `behaviours` partitions the instance holds (for the trainer: the changelog
    partitions it reads); `lag` maps ``"topic[p]"`` (`lag_key`) to records behind the high
    watermark. `model_published_at` is when the trainer published `model_version`,
    `model_loaded_at` when this instance swapped it in (unix s; None before any model).
    `events_applied` counts the events this process applied from its input (its store's at start
    included), `events_restored` those it restored from the changelog at assignments (scale-out).
    `at` is when the record was made (unix s; `StatusReporter` sets it at each send).
    """

    instance: str
    role: str
    host: str
    pid: int
    partitions: list[int] = field(default_factory=list)
    lag: dict[str, int] = field(default_factory=dict)
    model_version: int = 0
    model_published_at: float | None = None
    model_loaded_at: float | None = None
    events_applied: int = 0
    events_restored: int = 0
    at: float = 0.0
    state: str = RUNNING

    @property
    def total_lag(self) -> int:
        """Records behind, summed over the partitions with a known lag."""
        return sum(self.lag.values())

    def to_json(self) -> bytes:
        """The record's value: compact UTF-8 JSON of every field."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode(KEY_ENCODING)

    @classmethod
    def from_json(cls, value: bytes | str) -> InstanceStatus:
        """Parse a record's value; keys this version does not know are ignored. Raises ValueError
        for anything that is no status record (not JSON, a field missing or of the wrong type)."""
        try:
            raw = json.loads(value)
            if not isinstance(raw, dict):
                raise ValueError(f"a JSON {type(raw).__name__}, not an object")
            known = {f.name for f in fields(cls)}
            data = {k: v for k, v in raw.items() if k in known}
            status = cls(
                instance=_text(data["instance"]),
                role=_text(data["role"]),
                host=_text(data["host"]),
                pid=_integer(data["pid"]),
                partitions=[_integer(p) for p in _sequence(data.get("partitions", []))],
                lag={_text(k): _integer(v) for k, v in _mapping(data.get("lag", {})).items()},
                model_version=_integer(data.get("model_version", 0)),
                model_published_at=_optional_number(data.get("model_published_at")),
                model_loaded_at=_optional_number(data.get("model_loaded_at")),
                events_applied=_integer(data.get("events_applied", 0)),
                events_restored=_integer(data.get("events_restored", 0)),
                at=_number(data.get("at", 0.0)),
                state=_text(data.get("state", RUNNING)),
            )
        except KeyError as exc:
            raise ValueError(f"no {exc.args[0]!r} field") from None
        except (TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(str(exc)) from None
        if status.state not in STATES:
            raise ValueError(f"state {status.state!r} is none of {STATES}")
        return status


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _optional_number(value: Any) -> float | None:
    return None if value is None else _number(value)


def _sequence(value: Any) -> list:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {value!r}")
    return value


def default_instance_id() -> str:
    """``<hostname>-<pid>``: unique among the instances of one cluster as long as hosts are."""
    return f"{socket.gethostname()}-{os.getpid()}"


def instance_id(settings: CasmSettings) -> str:
    """`scale.instance_id`, or `default_instance_id()` when it is empty."""
    return settings.scale.instance_id.strip() or default_instance_id()


class StatusReporter:
    """Publishes `snapshot()` to `topic`, keyed by the instance id, at most every `every_s` seconds.

    Call `maybe_publish` from the service loop (the first call sends); `publish_stopped` once at
    shutdown, before the producer closes. Sends are best-effort: a send that fails (at once or
    after the producer's retries) is counted in `failed` and logged, as a warning the first time
    and at debug level after, never raised. Errors of `snapshot` itself propagate (a bug).
    `snapshot` runs on the caller's thread: it must read only what that thread may read.
    """

    def __init__(
        self,
        producer: AcknowledgedProducer,
        topic: str,
        every_s: float,
        snapshot: Callable[[], InstanceStatus],
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.every_s = every_s
        self.snapshot = snapshot
        self.published = 0  # records handed to the producer
        self.failed = 0  # records that could not be delivered
        self._last_sent: float | None = None  # monotonic s of the last send
        self._warned = False

    def due(self, now_monotonic: float | None = None) -> bool:
        """Whether `maybe_publish` would send now (never sent, or `every_s` passed since)."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        return self._last_sent is None or now - self._last_sent >= self.every_s

    def maybe_publish(self, now_monotonic: float | None = None) -> bool:
        """Send a status record if one is due (`now_monotonic`: ``time.monotonic()`` by default);
        True when one was sent (not yet acknowledged)."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        if not self.due(now):
            return False
        self._last_sent = now
        self._send(self.snapshot())
        return True

    def publish_stopped(self, timeout_s: float) -> bool:
        """Send the last record, with state ``stopped``, and wait up to `timeout_s` seconds for its
        acknowledgement; True when acknowledged."""
        outcome = self._send(replace(self.snapshot(), state=STOPPED))
        if outcome is None:
            return False
        if outcome.wait(timeout_s):
            return True
        if not outcome.done:
            log.warning("the stopped status record was not acknowledged within %.1f s", timeout_s)
        return False

    def _send(self, status: InstanceStatus) -> Outcome | None:
        status = replace(status, at=time.time())
        try:
            outcome = self.producer.send(
                self.topic, key=status.instance.encode(KEY_ENCODING), value=status.to_json(),
                on_fail=self._on_fail,
            )
        except Exception as exc:  # noqa: BLE001 - status is best-effort; the service goes on
            self._on_fail(exc)
            return None
        self.published += 1
        return outcome

    def _on_fail(self, exc: BaseException) -> None:
        # Runs on the producer's threads: count and log only.
        self.failed += 1
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "status record to %s not delivered (status is best-effort, later ones are "
                "still sent; further failures at debug level): %s", self.topic, exc)


def read_status(
    kafka_cfg: KafkaConfig, bootstrap: str, topic: str, timeout_s: float, tail: int | None = None
) -> dict[str, InstanceStatus]:
    """The newest record (greatest `at`; the later offset on a tie) of each instance in `topic`,
    read from the beginning (or only the last `tail` records: the topic grows by a record per
    instance per `scale.status_every_s`) to the high watermark without joining a group. Records that are no
    status record are skipped with a warning. Raises TimeoutError when the topic does not exist or
    its end is not reached within `timeout_s` seconds."""
    newest: dict[str, InstanceStatus] = {}
    skipped = 0
    for record in read_topic(kafka_cfg, bootstrap, topic, timeout_s, tail=tail):
        if record.value is None:
            continue  # a tombstone (an instance removed by compaction)
        try:
            status = InstanceStatus.from_json(record.value)
        except ValueError as exc:
            skipped += 1
            log.warning("skipped record %s[%d]@%d: no status record (%s)",
                        record.topic, record.partition, record.offset, exc)
            continue
        known = newest.get(status.instance)
        if known is None or status.at >= known.at:
            newest[status.instance] = status
    if skipped:
        log.warning("skipped %d records of %s that are no status record", skipped, topic)
    return newest


# ------------------------------------------------------------------------------ the table


def shown_state(status: InstanceStatus, now: float, stale_after_s: float) -> str:
    """``stopped``, ``stale`` (running, but its record is older than `stale_after_s` at `now`,
    unix s) or ``running``."""
    if status.state == STOPPED:
        return STOPPED
    return STALE if now - status.at > stale_after_s else RUNNING


def partition_ranges(partitions: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``; ``"-"`` when empty."""
    ordered = sorted(set(partitions))
    if not ordered:
        return "-"
    runs: list[list[int]] = [[ordered[0], ordered[0]]]
    for p in ordered[1:]:
        if p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def shared_partitions(statuses: Iterable[InstanceStatus]) -> dict[int, list[str]]:
    """Partitions held by more than one of `statuses`: partition -> the instances holding it."""
    holders: dict[int, list[str]] = {}
    for status in statuses:
        for p in sorted(set(status.partitions)):
            holders.setdefault(p, []).append(status.instance)
    return {p: sorted(names) for p, names in sorted(holders.items()) if len(names) > 1}


def _ago(now: float, then: float | None) -> str:
    return "-" if then is None else f"{max(0.0, now - then):.1f}"


COLUMNS = ("instance", "role", "state", "partitions", "lag", "model", "published_s", "loaded_s",
           "events", "age_s")
"""The table's header; `published_s`/`loaded_s`/`age_s`: seconds since the model version was
published, since this instance loaded it, and since the record was made."""


def format_status(
    statuses: Mapping[str, InstanceStatus],
    now: float,
    stale_after_s: float,
    expected_partitions: int | None = None,
) -> str:
    """A text table, one row per instance (sorted by role, then instance), and the checks of the
    running instances (not stopped, not stale at `now`, unix s): whether every ingest instance
    serves one model version, and whether the `behaviours` partitions they hold overlap (and, with
    `expected_partitions`, the number of `behaviours` partitions, which ones nobody holds)."""
    ordered = sorted(statuses.values(), key=lambda s: (s.role, s.instance))
    rows = [COLUMNS]
    for s in ordered:
        rows.append((
            s.instance, s.role, shown_state(s, now, stale_after_s), partition_ranges(s.partitions),
            str(s.total_lag) if s.lag else "-", str(s.model_version), _ago(now, s.model_published_at),
            _ago(now, s.model_loaded_at), str(s.events_applied), _ago(now, s.at),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    running = [s for s in ordered if shown_state(s, now, stale_after_s) == RUNNING]
    lines.append(_model_check(running))
    lines.append(_partition_check(running, expected_partitions))
    return "\n".join(lines)


def _model_check(running: Sequence[InstanceStatus]) -> str:
    ingest = [s for s in running if s.role in INGEST_ROLES]
    trainers = [s for s in running if s.role == "trainer"]
    trained = f" (trainer at version {max(s.model_version for s in trainers)})" if trainers else ""
    versions = {s.model_version for s in ingest}
    if not ingest:
        return f"model: no running ingest instance{trained}"
    if len(versions) == 1:
        return f"model: every running ingest instance serves version {versions.pop()}{trained}"
    each = ", ".join(f"{s.instance}={s.model_version}" for s in ingest)
    return f"model: running ingest instances serve DIFFERENT versions: {each}{trained}"


def _partition_check(running: Sequence[InstanceStatus], expected: int | None) -> str:
    holders = [s for s in running if s.role in PARTITION_ROLES]
    if not holders:
        return "partitions: no running instance holds behaviours partitions"
    shared = shared_partitions(holders)
    held = {p for s in holders for p in s.partitions}
    missing = sorted(set(range(expected)) - held) if expected is not None else []
    parts = []
    if shared:
        parts.append("held by two or more instances: " + "; ".join(
            f"{p} ({', '.join(names)})" for p, names in shared.items()))
    if missing:
        parts.append(f"held by no running instance: {partition_ranges(missing)}")
    if parts:
        return "partitions: " + "; ".join(parts)
    cover = f"all {expected}" if expected is not None else partition_ranges(held)
    return f"partitions: {cover} held by exactly one running instance each (no overlap)"


def statuses_json(statuses: Mapping[str, InstanceStatus]) -> dict[str, dict[str, Any]]:
    """`statuses` as plain values (instance -> the record's fields), for ``casm status --json``."""
    return {name: asdict(statuses[name]) for name in sorted(statuses)}
