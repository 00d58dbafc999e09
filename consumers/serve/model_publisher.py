"""The trainer role's model (scale-out): every version it adopts is also published to the models
topic (weights, version, alpha, item vocabulary), for every ingest instance to load."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from stream.delivery import AcknowledgedProducer
from stream.model_topic import encode_version

log = logging.getLogger(__name__)


class PublishingModel(ServingModel):
    """A `ServingModel` (the trainer's signals score with it) that publishes each loaded version.

    Args:
        item_ids: the store's item vocabulary in index order (the trainer's store holds every
            partition: its indices are the cluster's).
        alpha: the alpha in force, for versions loaded without theirs (a checkpoint at start-up).
    """

    def __init__(self, settings: CasmSettings, producer: AcknowledgedProducer, item_ids: Callable[[], list[str]],
                 alpha: Callable[[], dict[str, float]]) -> None:
        super().__init__(settings)
        self.settings = settings
        self.producer = producer
        self._item_ids = item_ids
        self._alpha = alpha
        self.published = 0
        self.publish_failures = 0

    def load(self, version: int, weights: dict[str, np.ndarray], num_items: int, behaviours: Sequence[str], *,
             alpha: Mapping[str, float] | None = None, item_ids: Sequence[str] | None = None,
             published_at: float | None = None) -> None:
        super().load(version, weights, num_items, behaviours, alpha=alpha)
        self._publish(version, weights, num_items, behaviours, dict(alpha) if alpha is not None else self._alpha())

    def _publish(self, version: int, weights: dict[str, np.ndarray], num_items: int, behaviours: Sequence[str],
                 alpha: dict[str, float]) -> None:
        """Chunks one after another (a retried chunk must not overtake the next), each acknowledged."""
        started = time.time()
        meta = {"num_items": int(num_items), "behaviours": list(behaviours), "item_ids": self._item_ids()[:num_items],
                "alpha": alpha, "published_at": started, "trainer": f"{socket.gethostname()}-{os.getpid()}"}
        records = encode_version(version, weights, meta, self.settings.scale.model_chunk_bytes)
        timeout_s = self.settings.kafka.request_timeout_ms / 1000.0
        for key, value, headers in records:
            if not self.producer.send(self.settings.topics.models, key=key, value=value, partition=0,
                                      headers=headers).wait(timeout_s):
                self.publish_failures += 1
                log.error("model version %d could not be published to %s (the next version will be)",
                          version, self.settings.topics.models)
                return
        self.published += 1
        self.published_at = started
        log.info("model version %d published to %s: %d records, %.1f MB, %.2f s", version,
                 self.settings.topics.models, len(records), sum(len(v) for _, v, _ in records) / 1e6,
                 time.time() - started)
