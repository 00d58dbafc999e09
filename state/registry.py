"""`Registry`: the store's registry and logs: model versions, alpha history, drift log, saved
component state and the last recommendation published per user (same file and lock as the
event store, none of its state)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from state.database import Database
from state.errors import RegistryError
from state.sequences import MISSING, Sequences

#: Reads users' newest events: `newest(user_ids, width=1)` (e.g. `EventStore.sequences`).
NewestEvents = Callable[..., Sequences]


class Registry:
    """Model versions, alpha history, drift log, component state, published lists.

    Args:
        db: the open file.
        newest_events: `EventStore.sequences` (its newest-event columns say which event a
            published list reflects).
        clock: wall clock (unix s).
    """

    def __init__(self, db: Database, newest_events: NewestEvents,
                 clock: Callable[[], float] = time.time):
        self._db = db
        self._newest_events = newest_events
        self._clock = clock

    def register_model(
        self,
        version: int,
        created_at: float,
        alpha: Mapping[str, float],
        metrics: Mapping[str, float],
        checkpoint_path: str,
    ) -> None:
        """Record a model version (unix s creation time, its alpha per behaviour, its metrics).

        Raises:
            RegistryError: `version` is registered already.
        """
        with self._db.lock:
            con = self._db.writable()
            if con.execute("SELECT 1 FROM models WHERE version = $1", [int(version)]).fetchall():
                raise RegistryError(f"model version {version} is registered already")
            self._db.transaction(lambda con: con.execute(
                "INSERT INTO models VALUES ($1, $2, $3, $4, $5, $6)",
                [int(version), float(created_at), _json(alpha), _json(metrics),
                 str(checkpoint_path), float(self._clock())],
            ))

    def models(self) -> list[dict[str, Any]]:
        """Registered models, oldest version first: version, created_at, alpha, metrics,
        checkpoint_path, registered_at."""
        with self._db.lock:
            rows = self._db.con.execute(
                "SELECT version, created_at, alpha, metrics, checkpoint_path, registered_at "
                "FROM models ORDER BY version"
            ).fetchall()
        return [
            {"version": v, "created_at": c, "alpha": json.loads(a), "metrics": json.loads(m),
             "checkpoint_path": p, "registered_at": r}
            for v, c, a, m, p, r in rows
        ]

    def latest_model(self) -> dict[str, Any] | None:
        """The registered model with the highest version, or None."""
        models = self.models()
        return models[-1] if models else None

    def record_alpha(self, at: float, alpha: Mapping[str, float], reason: str) -> None:
        """Append to the alpha history (unix s, alpha per behaviour, why it changed)."""
        with self._db.lock:
            self._db.transaction(lambda con: con.execute(
                "INSERT INTO alpha_history SELECT coalesce(max(n), 0) + 1, $1, $2, $3 "
                "FROM alpha_history",
                [float(at), _json(alpha), str(reason)],
            ))

    def alpha_history(self) -> list[dict[str, Any]]:
        """The alpha history in the order recorded: at, alpha, reason."""
        with self._db.lock:
            rows = self._db.con.execute(
                "SELECT happened_at, alpha, reason FROM alpha_history ORDER BY n"
            ).fetchall()
        return [{"at": at, "alpha": json.loads(a), "reason": r} for at, a, r in rows]

    def save_component_state(self, name: str, state: bytes, events_applied: int, at: float) -> None:
        """Keep `state` (opaque bytes) as component `name`'s newest saved state, replacing the
        previous one (unix s `at`, saved when `events_applied` events were applied)."""
        with self._db.lock:
            self._db.transaction(lambda con: con.execute(
                "INSERT OR REPLACE INTO component_state VALUES ($1, $2, $3, $4)",
                [str(name), float(at), int(events_applied), bytes(state)],
            ))

    def component_state(self, name: str) -> tuple[bytes, int] | None:
        """Component `name`'s newest saved state and the applied-event count it was saved at."""
        with self._db.lock:
            rows = self._db.con.execute(
                "SELECT state, events_applied FROM component_state WHERE name = $1", [str(name)]
            ).fetchall()
        return (bytes(rows[0][0]), int(rows[0][1])) if rows else None

    def record_drift(
        self,
        at: float,
        behaviour: str,
        detector: str,
        signal: str,
        value: float,
        old_alpha: float,
        new_alpha: float,
    ) -> None:
        """Append to the drift log (unix s, the behaviour, detector and signal that fired, the
        signal's value, alpha before and after)."""
        with self._db.lock:
            self._db.transaction(lambda con: con.execute(
                "INSERT INTO drift_log SELECT coalesce(max(n), 0) + 1, $1, $2, $3, $4, $5, $6, $7 "
                "FROM drift_log",
                [float(at), str(behaviour), str(detector), str(signal), float(value),
                 float(old_alpha), float(new_alpha)],
            ))

    def drift_log(self) -> list[dict[str, Any]]:
        """The drift log in the order recorded."""
        with self._db.lock:
            rows = self._db.con.execute(
                "SELECT happened_at, behaviour, detector, signal, value, old_alpha, new_alpha "
                "FROM drift_log ORDER BY n"
            ).fetchall()
        keys = ("at", "behaviour", "detector", "signal", "value", "old_alpha", "new_alpha")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def record_published(
        self,
        user_ids: Sequence[str],
        model_version: int,
        items: Sequence[Sequence[str]],
        *,
        published_at: float | None = None,
        event_offsets: Sequence[int] | None = None,
    ) -> int:
        """Remember the last recommendation published per user (set-based; the last entry of a
        user repeated in `user_ids` wins).

        Args:
            user_ids: users, [n].
            model_version: the model that scored them.
            items: recommended external item ids per user, best first, [n][k].
            published_at: unix s (default: now).
            event_offsets: per user, the offset of the newest event the recommendation reflects
                (default: the user's newest applied event).

        Returns:
            Users recorded.
        """
        user_ids = list(user_ids)
        if len(items) != len(user_ids) or (
            event_offsets is not None and len(event_offsets) != len(user_ids)
        ):
            raise ValueError("user_ids, items and event_offsets must have the same length")
        with self._db.lock:
            self._db.writable()
            if not user_ids:
                return 0
            last = {u: k for k, u in enumerate(user_ids)}
            keep = np.fromiter(last.values(), dtype=np.int64, count=len(last))
            users = [user_ids[k] for k in keep.tolist()]
            seqs = self._newest_events(users, width=1)
            offsets = (
                np.asarray(event_offsets, dtype=np.int64)[keep]
                if event_offsets is not None else seqs.last_offset
            )
            when = float(self._clock() if published_at is None else published_at)
            table = pa.table({
                "user_id": pa.array(users, pa.string()),
                "topic": pa.array(seqs.last_topic, pa.string()),
                "partition": pa.array(seqs.last_partition, pa.int32(),
                                      mask=seqs.last_partition == MISSING),
                "model_version": pa.array([int(model_version)] * len(users), pa.int32()),
                "items": pa.array([list(items[k]) for k in keep.tolist()], pa.list_(pa.string())),
                "published_at": pa.array([when] * len(users), pa.float64()),
                "event_offset": pa.array(offsets, pa.int64(), mask=offsets == MISSING),
            })

            def write(con: duckdb.DuckDBPyConnection) -> None:
                con.register("_published", table)
                try:
                    con.execute(
                        "DELETE FROM published WHERE user_id IN (SELECT user_id FROM _published)"
                    )
                    con.execute("INSERT INTO published SELECT * FROM _published")
                finally:
                    con.unregister("_published")

            self._db.transaction(write)
            return len(users)

    def last_published(self, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The last recommendation published to each of `user_ids` that has one:
        {user_id: {model_version, items, published_at, event_offset, topic, partition}}."""
        with self._db.lock:
            con = self._db.con
            query = pa.table({"user_id": pa.array(list(user_ids), pa.string())})
            con.register("_asked", query)
            try:
                rows = con.execute(
                    'SELECT user_id, model_version, items, published_at, event_offset, topic, '
                    '"partition" FROM published WHERE user_id IN (SELECT user_id FROM _asked)'
                ).fetchall()
            finally:
                con.unregister("_asked")
        keys = ("model_version", "items", "published_at", "event_offset", "topic", "partition")
        return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in rows}


def _json(values: Mapping[str, float]) -> str:
    return json.dumps({str(k): float(v) for k, v in values.items()}, sort_keys=True)
