"""Replay producer: sends a table of events (a historical log, or the synthetic stream) to the
`behaviours` topic in table order (logs are sorted by time), keyed by user, as JSON
`BehaviourEvent`s, paced by event time (``--speed 60x``), by rate (``--rate 5000/s``) or as fast as
the producer goes (``--max``), with a progress bar, and reports what it sent.

Every event gets ``event_id = f"{source_name}:{row}"`` (its row in the table), so replaying the same
log again produces the same ids and the consumer can drop the duplicates.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from kafka import KafkaProducer
from tqdm import tqdm

from stream.clients import KEY_ENCODING

log = logging.getLogger(__name__)

PROGRESS_EVERY = 1_000
"""Rows between two progress-bar updates (updating per row costs more than a send)."""
MIN_SLEEP_S = 0.001
"""Pacing sleeps only when at least this far ahead of schedule (finer sleeps overshoot)."""

SYNTHETIC_METADATA_KEY = b"casm.source"
SYNTHETIC_METADATA_VALUE = b"synthetic"
SYNTHETIC_CONTEXT: dict[str, Any] = {"synthetic": True}


def is_synthetic_table(events: pa.Table) -> bool:
    """Whether `events` carries the synthetic label in its schema metadata."""
    metadata = events.schema.metadata or {}
    return metadata.get(SYNTHETIC_METADATA_KEY) == SYNTHETIC_METADATA_VALUE


@dataclass(frozen=True)
class Pacing:
    """How fast to replay: ``max`` (no waiting), ``speed`` (event time runs `value` times faster
    than the wall clock) or ``rate`` (`value` events per second)."""

    mode: Literal["max", "speed", "rate"] = "max"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.mode != "max" and not (math.isfinite(self.value) and self.value > 0):
            raise ValueError(f"pacing {self.mode} needs a positive finite value, got {self.value}")

    def __str__(self) -> str:
        if self.mode == "speed":
            return f"{self.value:g}x event time"
        if self.mode == "rate":
            return f"{self.value:g} events/s"
        return "as fast as possible"


_SPEED = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*[xX]?\s*$")
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(?:/\s*s)?\s*$")


def parse_pacing(speed: str | None = None, rate: str | None = None, fastest: bool = False) -> Pacing:
    """``speed="60x"`` (or ``"60"``), ``rate="5000/s"`` (or ``"5000"``), or `fastest`; at most one.
    Nothing given means as fast as possible."""
    given = [name for name, value in (("speed", speed), ("rate", rate), ("max", fastest)) if value]
    if len(given) > 1:
        raise ValueError(f"give one of --speed, --rate, --max, not {' and '.join(given)}")
    if speed:
        match = _SPEED.match(speed)
        if not match:
            raise ValueError(f"speed {speed!r} is not like 60x")
        return Pacing("speed", float(match.group(1)))
    if rate:
        match = _RATE.match(rate)
        if not match:
            raise ValueError(f"rate {rate!r} is not like 5000/s")
        return Pacing("rate", float(match.group(1)))
    return Pacing("max")


@dataclass
class ReplayReport:
    """What a replay sent: of `events` rows, `sent` were acknowledged by the broker, `failed` were
    not (producer errors), and the rest were never handed over (an interrupted replay)."""

    topic: str
    source: str
    pacing: str
    events: int
    sent: int
    failed: int
    duration_s: float
    first_timestamp: float | None
    last_timestamp: float | None
    synthetic: bool
    interrupted: bool = False
    first_error: str | None = None
    users: int = 0

    @property
    def rate(self) -> float:
        """Events acknowledged per wall-clock second."""
        return self.sent / self.duration_s if self.duration_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}

    def summary(self) -> str:
        """The report in words (what `casm replay` prints)."""
        span = ""
        if self.first_timestamp is not None and self.last_timestamp is not None:
            span = (
                f"\n  event time  {_iso(self.first_timestamp)} .. {_iso(self.last_timestamp)} "
                f"({(self.last_timestamp - self.first_timestamp) / 3600:.1f} h)"
            )
        lines = [
            f"replayed {self.source} to topic {self.topic!r}"
            + (" (SYNTHETIC data)" if self.synthetic else "")
            + (" - interrupted" if self.interrupted else ""),
            f"  sent        {self.sent:,} of {self.events:,} events ({self.failed:,} failed), "
            f"{self.users:,} users",
            f"  pacing      {self.pacing}",
            f"  duration    {self.duration_s:.2f} s ({self.rate:,.0f} events/s)" + span,
        ]
        if self.first_error:
            lines.append(f"  first error {self.first_error}")
        return "\n".join(lines)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def encode_events(
    events: pa.Table,
    source_name: str,
    context: Mapping[str, Any] | None = None,
    start: int = 0,
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of each row of `events` from row `start`: key the user id (UTF-8), value the
    JSON `BehaviourEvent` with ``event_id = f"{source_name}:{row}"`` and `context` if given."""
    columns = [events.column(name).to_pylist() for name in ("user_id", "item_id", "behavior", "timestamp")]
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
    extra = dict(context) if context else None
    for row in range(start, events.num_rows):
        user, item, behaviour, ts = columns[0][row], columns[1][row], columns[2][row], columns[3][row]
        message: dict[str, Any] = {
            "user_id": user,
            "item_id": item,
            "behavior": behaviour,
            "timestamp": ts,
            "event_id": f"{source_name}:{row}",
        }
        if extra is not None:
            message["context"] = extra
        yield user.encode(KEY_ENCODING), dumps(message).encode("utf-8")


def replay(
    events: pa.Table,
    producer: KafkaProducer,
    topic: str,
    pacing: Pacing | None = None,
    *,
    source_name: str = "replay",
    progress: bool = True,
    limit: int | None = None,
    context: Mapping[str, Any] | None = None,
    flush_timeout_s: float | None = None,
) -> ReplayReport:
    """Produce the rows of `events` (columns user_id, item_id, behavior, timestamp) to `topic` in
    table order, keyed by user. A synthetic table (`is_synthetic_table`) is labelled with
    ``context={"synthetic": true}`` unless `context` is given. Stops early, reporting what was sent,
    on KeyboardInterrupt. Flushes the producer before returning."""
    pacing = pacing or Pacing()
    synthetic = is_synthetic_table(events)
    if context is None and synthetic:
        context = SYNTHETIC_CONTEXT
    if limit is not None:
        events = events.slice(0, max(0, limit))
    total = events.num_rows
    timestamps = events.column("timestamp").to_pylist()
    failures: list[BaseException] = []

    def on_error(exc: BaseException) -> None:
        failures.append(exc)

    bar = tqdm(total=total, unit="ev", desc=f"replay -> {topic}", disable=not progress, mininterval=0.5)
    handed = 0
    interrupted = False
    started = time.monotonic()
    first_ts = timestamps[0] if total else None
    speed = pacing.value if pacing.mode == "speed" else 0.0
    rate = pacing.value if pacing.mode == "rate" else 0.0
    send = producer.send
    try:
        for row, (key, value) in enumerate(encode_events(events, source_name, context)):
            if speed:
                ahead = started + (timestamps[row] - first_ts) / speed - time.monotonic()
            elif rate:
                ahead = started + row / rate - time.monotonic()
            else:
                ahead = 0.0
            if ahead > MIN_SLEEP_S:
                time.sleep(ahead)
            send(topic, key=key, value=value).add_errback(on_error)
            handed += 1
            if handed % PROGRESS_EVERY == 0:
                bar.update(PROGRESS_EVERY)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("replay interrupted after %d events; flushing what was sent", handed)
    finally:
        producer.flush(timeout=flush_timeout_s)
        bar.update(handed - bar.n)
        bar.close()
    duration = time.monotonic() - started
    failed = len(failures)
    if failed:
        log.error("%d events were not delivered, e.g. %s", failed, failures[0])
    users = pc.count_distinct(events.column("user_id").slice(0, handed)).as_py() if handed else 0
    return ReplayReport(
        topic=topic,
        source=source_name,
        pacing=str(pacing),
        events=total,
        sent=handed - failed,
        failed=failed,
        duration_s=duration,
        first_timestamp=first_ts,
        last_timestamp=timestamps[handed - 1] if handed else None,
        synthetic=synthetic or bool(context and context.get("synthetic")),
        interrupted=interrupted,
        first_error=repr(failures[0]) if failures else None,
        users=users,
    )
