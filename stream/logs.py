"""Readers of historical behaviour logs, each in its native file layout.

Every reader returns the same columns, stably sorted by time (ties keep file order):

    user_id: str, item_id: str, behavior: str, timestamp: float64 (unix seconds)

as a `pyarrow.Table`, so the offline evaluation and the replay producer read logs the same way.
A malformed row raises `LogFormatError` naming the file and line; with ``skip_malformed=True``
it is skipped and counted instead (never silently: the count and the first examples are kept).
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

LogFormat = Literal["generic", "taobao", "movielens", "retailrocket"]
LOG_FORMATS: tuple[str, ...] = ("generic", "taobao", "movielens", "retailrocket")

#: The columns of events read from a log file (and of the synthetic stream): user, item, behaviour
#: and event time (unix s), nothing else. Not the columns of a batch the state store applies,
#: which add the Kafka coordinates (topic, partition, offset) and the optional event_id /
#: produced_ms of decoded records (DEVELOPERS.md, "Event columns").
LOG_EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("behavior", pa.string()),
        ("timestamp", pa.float64()),
    ]
)

_MAX_EXAMPLES = 5
TAOBAO_BEHAVIOURS = ("pv", "cart", "fav", "buy")
RETAILROCKET_BEHAVIOURS = ("view", "addtocart", "transaction")


class LogFormatError(ValueError):
    """A row of a log file does not fit its format; the message names file and line."""


@dataclass
class LoadedLog:
    """A log read into columns, with what was skipped."""

    events: pa.Table
    path: Path
    format: str
    rows_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    @property
    def num_events(self) -> int:
        return self.events.num_rows


@dataclass(frozen=True)
class MovieLensThresholds:
    """Star ratings to behaviours: <= dislike_max is dislike, >= like_min is like, else neutral."""

    dislike_max: float = 2.0
    like_min: float = 4.0

    def behaviour(self, rating: float) -> str:
        if rating <= self.dislike_max:
            return "dislike"
        if rating >= self.like_min:
            return "like"
        return "neutral"


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _timestamp(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timestamp {text!r} is not a non-negative unix time")
    return value


# A row parser gets the split fields and returns (user, item, behaviour, unix seconds) or raises
# ValueError with the reason.
RowParser = Callable[[list[str]], tuple[str, str, str, float]]


def _id(text: str, what: str) -> str:
    text = text.strip()
    if not text:
        raise ValueError(f"empty {what}")
    return text


def _read_rows(
    path: Path,
    rows: Iterator[list[str]],
    parse: RowParser,
    fmt: str,
    skip_malformed: bool,
    first_line: int,
) -> LoadedLog:
    users: list[str] = []
    items: list[str] = []
    behaviours: list[str] = []
    times: list[float] = []
    skipped = 0
    examples: list[str] = []
    for line_no, fields in enumerate(rows, start=first_line):
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # blank line
        try:
            user, item, behaviour, ts = parse(fields)
        except (ValueError, IndexError) as exc:
            reason = f"{path}:{line_no}: {exc} (row {fields!r:.200})"
            if not skip_malformed:
                raise LogFormatError(reason) from None
            skipped += 1
            if len(examples) < _MAX_EXAMPLES:
                examples.append(reason)
            continue
        users.append(user)
        items.append(item)
        behaviours.append(behaviour)
        times.append(ts)
    if skipped:
        log.warning("%s: skipped %d malformed rows, e.g. %s", path, skipped, examples[0])
    ts_array = np.asarray(times, dtype=np.float64)
    order = np.argsort(ts_array, kind="stable")
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "item_id": pa.array(items, pa.string()),
            "behavior": pa.array(behaviours, pa.string()),
            "timestamp": pa.array(ts_array),
        },
        schema=LOG_EVENT_SCHEMA,
    ).take(pa.array(order))
    return LoadedLog(table, path, fmt, skipped, examples)


def read_generic(path: Path, skip_malformed: bool = False) -> LoadedLog:
    """Our generic CSV (optionally .gz): header with at least user_id,item_id,behavior,timestamp
    (timestamp in unix seconds); other columns are ignored."""
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        required = ("user_id", "item_id", "behavior", "timestamp")
        missing = [c for c in required if c not in header]
        if missing:
            raise LogFormatError(f"{path}:1: header {header} lacks columns {missing}")
        iu, ii, ib, it = (header.index(c) for c in required)
        width = len(header)

        def parse(f: list[str]) -> tuple[str, str, str, float]:
            if len(f) != width:
                raise ValueError(f"expected {width} fields, got {len(f)}")
            return _id(f[iu], "user_id"), _id(f[ii], "item_id"), _id(f[ib], "behavior"), _timestamp(f[it])

        return _read_rows(path, reader, parse, "generic", skip_malformed, first_line=2)


def read_taobao(path: Path, skip_malformed: bool = False) -> LoadedLog:
    """Taobao UserBehavior.csv (Tianchi 649): no header,
    ``user_id,item_id,category_id,behavior_type,timestamp``; category is dropped."""

    def parse(f: list[str]) -> tuple[str, str, str, float]:
        if len(f) != 5:
            raise ValueError(f"expected 5 fields, got {len(f)}")
        behaviour = f[3].strip()
        if behaviour not in TAOBAO_BEHAVIOURS:
            raise ValueError(f"unknown behavior_type {behaviour!r}")
        return _id(f[0], "user_id"), _id(f[1], "item_id"), behaviour, _timestamp(f[4])

    with _open_text(path) as handle:
        return _read_rows(path, csv.reader(handle), parse, "taobao", skip_malformed, first_line=1)


def _movielens_file(path: Path) -> Path:
    if path.is_dir():
        for name in ("u.data", "ratings.dat", "ratings.csv"):
            if (path / name).exists():
                return path / name
        raise FileNotFoundError(f"{path}: no u.data, ratings.dat or ratings.csv in this MovieLens folder")
    return path


def read_movielens(
    path: Path, skip_malformed: bool = False, thresholds: MovieLensThresholds | None = None
) -> LoadedLog:
    """MovieLens ratings as dislike / neutral / like. Accepts the ML-100K folder or ``u.data``
    (tab-separated), ML-1M/10M ``ratings.dat`` (``::``), or ``ratings.csv`` of the newer sets
    (header ``userId,movieId,rating,timestamp``)."""
    thresholds = thresholds or MovieLensThresholds()
    path = _movielens_file(path)

    def parse(f: list[str]) -> tuple[str, str, str, float]:
        if len(f) != 4:
            raise ValueError(f"expected 4 fields, got {len(f)}")
        rating = float(f[2])
        if not math.isfinite(rating):
            raise ValueError(f"rating {f[2]!r} is not a number")
        return _id(f[0], "user id"), _id(f[1], "item id"), thresholds.behaviour(rating), _timestamp(f[3])

    with _open_text(path) as handle:
        name = path.name.removesuffix(".gz")
        if name.endswith(".dat"):
            rows: Iterator[list[str]] = (line.rstrip("\r\n").split("::") for line in handle)
            first = 1
        elif name.endswith(".csv"):
            rows = csv.reader(handle)
            next(rows, None)
            first = 2
        else:
            rows = (line.rstrip("\r\n").split("\t") for line in handle)
            first = 1
        return _read_rows(path, rows, parse, "movielens", skip_malformed, first_line=first)


def read_retailrocket(path: Path, skip_malformed: bool = False) -> LoadedLog:
    """RetailRocket ``events.csv`` (header ``timestamp,visitorid,event,itemid,transactionid``,
    timestamp in milliseconds); behaviours view / addtocart / transaction. Accepts the folder too."""
    if path.is_dir():
        path = path / "events.csv"
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        required = ("timestamp", "visitorid", "event", "itemid")
        missing = [c for c in required if c not in header]
        if missing:
            raise LogFormatError(f"{path}:1: header {header} lacks columns {missing}")
        it, iu, ie, ii = (header.index(c) for c in required)
        width = len(header)

        def parse(f: list[str]) -> tuple[str, str, str, float]:
            if len(f) != width:
                raise ValueError(f"expected {width} fields, got {len(f)}")
            event = f[ie].strip()
            if event not in RETAILROCKET_BEHAVIOURS:
                raise ValueError(f"unknown event {event!r}")
            return _id(f[iu], "visitorid"), _id(f[ii], "itemid"), event, _timestamp(f[it]) / 1000.0

        return _read_rows(path, reader, parse, "retailrocket", skip_malformed, first_line=2)


_READERS: dict[str, Callable[..., LoadedLog]] = {
    "generic": read_generic,
    "taobao": read_taobao,
    "movielens": read_movielens,
    "retailrocket": read_retailrocket,
}


def read_log(path: str | Path, fmt: str = "generic", skip_malformed: bool = False) -> LoadedLog:
    """Read a log of format `fmt` (one of LOG_FORMATS) from `path` (a file, or the data set's
    folder where the format has one). For the generic format a folder means ``events.csv.gz``."""
    path = Path(path)
    if fmt not in _READERS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {LOG_FORMATS}")
    if fmt == "generic" and path.is_dir():
        path = path / "events.csv.gz"
    if not path.exists():
        raise FileNotFoundError(f"log not found: {path}")
    loaded = _READERS[fmt](path, skip_malformed=skip_malformed)
    log.info("read %d events from %s (%s)", loaded.num_events, loaded.path, fmt)
    return loaded


def read_heldout(path: str | Path) -> pa.Table:
    """Held-out test items given apart from the log (``user_id,item_id`` CSV, optionally .gz),
    such as ``yelp_khgt/heldout_pos.csv.gz``. Returns columns user_id, item_id (strings)."""
    path = Path(path)
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["user_id", "item_id"]:
            raise LogFormatError(f"{path}:1: expected header user_id,item_id, got {header}")
        users: list[str] = []
        items: list[str] = []
        for line_no, f in enumerate(reader, start=2):
            if len(f) < 2 or not f[0].strip() or not f[1].strip():
                raise LogFormatError(f"{path}:{line_no}: expected user_id,item_id, got {f!r:.200}")
            users.append(f[0].strip())
            items.append(f[1].strip())
    return pa.table({"user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string())})
