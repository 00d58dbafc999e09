"""The ingest role's model: versions published by the trainer (`PublishingModel`) reach a
`ModelFollower` through the models topic, the newest first, with the trainer's item vocabulary."""

from __future__ import annotations

import time

import pytest

from casm_core.model import CASM
from consumers.serve.model_follower import ModelFollower
from consumers.serve.model_publisher import PublishingModel
from consumers.serve.serving_model import ServingModel
from consumers.settings import CasmSettings
from consumers.telemetry import ServiceMetrics
from stream.clients import make_producer
from stream.delivery import acknowledged_producer
from stream.topics import ensure_topics

pytestmark = pytest.mark.integration

WAIT_S = 30.0


class CountingModel(ServingModel):
    def __init__(self, settings: CasmSettings) -> None:
        super().__init__(settings)
        self.loaded: list[int] = []

    def load(self, version, weights, num_items, behaviours, **kwargs) -> None:
        super().load(version, weights, num_items, behaviours, **kwargs)
        self.loaded.append(version)


def test_followers_load_the_newest_version_with_its_vocabulary(kafka_bootstrap: str, kafka_config, topic_names) -> None:
    settings = CasmSettings(kafka=kafka_config, topics=topic_names, progress=False,
                            model={"hidden_dim": 16, "context_dim": 8, "ffn_dim": 16, "max_len": 10},
                            scale={"model_chunk_bytes": 4096})
    ensure_topics(kafka_bootstrap, settings.kafka, settings.topics)
    producer = acknowledged_producer(settings.kafka, kafka_bootstrap, make_producer)
    items = [f"item{k}" for k in range(300)]
    trainer = PublishingModel(settings, producer, lambda: items, lambda: {"buy": 1.0})
    names = settings.behaviours.names
    for version in (1, 2, 3):
        model = CASM(settings.model, 100 * version, len(names))
        trainer.load(version, {k: v.numpy() for k, v in model.state_dict().items()}, 100 * version, names,
                     alpha={"buy": float(version)})
    assert trainer.published == 3
    followed = CountingModel(settings)
    follower = ModelFollower(settings, kafka_bootstrap, followed, ServiceMetrics(10.0))
    follower.initialize()
    try:
        deadline = time.monotonic() + WAIT_S
        while followed.version < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        # Started at the newest version (with one version's margin), not at the first.
        assert followed.loaded[-1] == 3 and 1 not in followed.loaded
        version, scorer, vocabulary = followed.snapshot
        assert scorer.num_items == 300 and vocabulary == items  # the trainer's first 300 items
        assert followed.published_at is not None and followed.loaded_at >= followed.published_at
        model = CASM(settings.model, 50, len(names))  # a newer version arrives while following
        trainer.load(4, {k: v.numpy() for k, v in model.state_dict().items()}, 50, names)
        deadline = time.monotonic() + WAIT_S
        while followed.version < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert followed.loaded[-2:] == [3, 4] and followed.snapshot[2] == items[:50]
    finally:
        follower.terminate(5.0)
        producer.close(5.0)
