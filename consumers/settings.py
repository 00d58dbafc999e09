"""The one settings tree of casm-stream.

Every option is read from (highest priority first) the command line, the environment (prefix
``CASM_``, sections joined by ``__``: ``CASM_KAFKA__BOOTSTRAP_SERVERS``), a preset file, and the
defaults below. The CLI spells the same names as ``--kafka.bootstrap-servers``.
The leaf packages (casm_core, state, stream) each define their own sections; this module only
composes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from casm_core.config import BehaviourConfig, EvalConfig, ModelConfig, TrainConfig
from state.config import StoreConfig
from stream.config import BrokerConfig, EventLimits, KafkaConfig, TopicsConfig


class CasmSettings(BaseSettings):
    """All configuration of casm-stream."""

    model_config = SettingsConfigDict(
        env_prefix="CASM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    data_dir: Path = Field(
        Path("../shared/data"), description="Folder of the shared real logs (<name>/events.csv.gz)."
    )
    device: Literal["auto", "cpu", "cuda"] | str = Field(
        "auto", description="torch device for training and scoring; auto picks cuda when present."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level.")
    progress: bool = Field(True, description="Show progress bars on long work.")

    behaviours: BehaviourConfig = Field(default_factory=BehaviourConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    topics: TopicsConfig = Field(default_factory=TopicsConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    events: EventLimits = Field(default_factory=EventLimits)
