"""The ingest role's partitions (scale-out): state follows the partitions a rebalance assigns.

At every assignment (kafka-python rebalances eagerly: everything is revoked, then the new set
assigned; the revocation has already applied and committed the batches in hand, see
`Service._on_revoke`):

1. partitions this instance held and no longer has are **released**: the lists pending for their
   users are published first (their events are applied), then their rows leave the store
   (`StateStore.release`): the store holds only what is assigned;
2. every assigned partition is brought up to its **changelog**: the store records, per partition,
   the changelog's next offset it has applied (committed with the input offsets); when that is
   the changelog's high watermark the local file is current and nothing is read, else the
   records from there on are applied, through the store's exactly-once rules (a partition's
   records carry its input offsets, so what the file holds already is dropped as a redelivery);
   a file that is not a prefix of its partition's changelog (a zombie's commit: see
   `stream.changelog`) is detected by the records' chain, and that partition is released and
   restored from the changelog's start;
3. the users restored are queued for a refresh: their newest events may have no published list
   (the previous owner may have died between its commit and its publication).

The service then seeks each input partition to the offset the store now holds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer

from consumers.serve.publisher import Publisher
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from state.store import StateStore
from stream.changelog import ChangelogDecoder, ChangelogGap, read_partitions
from stream.clients import make_consumer

log = logging.getLogger(__name__)


@dataclass
class Restored:
    """What one assignment did."""

    released: list[int] = field(default_factory=list)
    restored_events: dict[int, int] = field(default_factory=dict)  # partition -> events applied from the changelog
    seconds: float = 0.0  # wall s to bring them all up to date
    refreshed_users: int = 0


class PartitionStates:
    """Releases and restores partitions at assignments (see the module docstring)."""

    def __init__(self, settings: CasmSettings, bootstrap: str, store: StateStore, publisher: Publisher,
                 metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.store = store
        self.publisher = publisher
        self.metrics = metrics
        self.source = settings.topics.behaviours
        self.changelog = settings.topics.changelog
        self._consumer: KafkaConsumer | None = None
        self.events_restored = 0  # in all assignments

    def held(self) -> set[int]:
        """Input partitions the store holds state (offsets) of."""
        return {p for topic, p in self.store.partitions() if topic in (self.source, self.changelog)}

    def assigned(self, partitions: list[int]) -> Restored:
        """Release what moved away, bring every assigned partition up to its changelog."""
        done = Restored()
        lost = sorted(self.held() - set(partitions))
        if lost:
            self._release(lost)
            done.released = lost
        started = time.monotonic()
        done.restored_events, touched = self._restore(partitions)
        self.events_restored += sum(done.restored_events.values())
        done.seconds = time.monotonic() - started
        self.metrics.restore_seconds.observe(done.seconds)
        for partition, events in done.restored_events.items():
            if events:
                self.metrics.restored_events.labels(str(partition)).inc(events)
        if touched:
            self.publisher.touch(sorted(touched), time.monotonic())
        done.refreshed_users = len(touched)
        log.info("assignment %s: released %s; restored from %s: %s events in %.2f s; %d users to refresh",
                 sorted(partitions), lost, self.changelog, done.restored_events, done.seconds, len(touched))
        return done

    def _release(self, lost: list[int]) -> None:
        if not self.publisher.wait_idle(self.settings.serve.worker_timeout_s):
            log.warning("lists were still pending when partitions %s were released", lost)
        users = self.store.user_ids()
        if users:
            last = self.store.sequences(users, width=1).last_partition
            gone = set(lost)
            self.publisher.forget([u for u, p in zip(users, last.tolist(), strict=True) if p in gone])
        self.store.release([(topic, p) for p in lost for topic in (self.source, self.changelog)])
        self.metrics.released_partitions.inc(len(lost))

    def _restore(self, partitions: list[int]) -> tuple[dict[int, int], set[str]]:
        """Apply each partition's changelog from the store's changelog offset to its end; returns
        the events applied per partition and the users they touched. A partition whose file is
        not a prefix of its changelog (`ChangelogGap`: this instance committed a batch as a
        zombie, past what the partition's owner meanwhile wrote) is released and restored from
        the changelog's start.

        Raises:
            ChangelogGap: the changelog itself lacks records (deleted by its retention, or state
                written before the changelog).
        """
        applied, users, gaps = self._read(partitions, self.store.offsets(self.changelog), self.store.offsets(self.source))
        if gaps:
            for partition, gap in sorted(gaps.items()):
                log.warning("partition %d: the file is not a prefix of its changelog (%s); restoring it from the "
                            "changelog's start", partition, gap)
            self._release(sorted(gaps))  # (its users' pending lists too: they are refreshed after the rebuild)
            self.metrics.changelog_gaps.inc(len(gaps))
            again, more_users, still = self._read(sorted(gaps), {}, {})
            if still:
                raise next(iter(still.values()))
            applied.update(again)
            users |= more_users
        return applied, users

    def _read(self, partitions: list[int], changelog: dict[int, int], stored: dict[int, int],
              ) -> tuple[dict[int, int], set[str], dict[int, ChangelogGap]]:
        """One read of `partitions`' changelog from `changelog` (partition -> offset; 0 where
        absent) to its end, applied on top of the `stored` input offsets: events applied per
        partition, users touched, and the partitions left at a gap (nothing applied after it)."""
        decoders = {p: ChangelogDecoder({(self.source, p): stored.get(p, 0)}) for p in partitions}
        applied = dict.fromkeys(partitions, 0)
        users: set[str] = set()
        gaps: dict[int, ChangelogGap] = {}
        for partition, records in read_partitions(self._reader(), self.changelog,
                                                  {p: changelog.get(p, 0) for p in partitions},
                                                  self.settings.scale.restore_timeout_s,
                                                  self.settings.kafka.max_poll_records):
            if partition in gaps:
                continue
            try:
                decoded = decoders[partition].decode(records)
            except ChangelogGap as gap:
                gaps[partition] = gap
                continue
            result = self.store.apply(decoded.events, decoded.offsets)
            applied[partition] += result.applied
            users.update(result.touched_users)
        return applied, users, gaps

    def _reader(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = make_consumer(self.settings.kafka, self.bootstrap, group_id=None)
        return self._consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
