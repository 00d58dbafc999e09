"""The one settings tree of casm-stream.

Every option is read from (highest priority first) the command line, the environment (prefix
``CASM_``, sections joined by ``__``: ``CASM_KAFKA__BOOTSTRAP_SERVERS``), a preset file, a
command's profile (``evaluate-stream --max``) and the defaults below, merged per field
(`consumers.presets.load_settings`). The CLI spells the same names as ``--kafka.bootstrap-servers``.
Settings of one section that must agree with another's are checked once, at load (`CasmSettings`).
The leaf packages (casm_core, state, stream) each define their own sections; this module only
composes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from casm_core.config import BehaviourConfig, EvalConfig, ModelConfig, TrainConfig
from state.config import StoreConfig
from stream.config import BrokerConfig, EventLimits, KafkaConfig, SyntheticConfig, TopicsConfig


class ServeConfig(BaseModel):
    """The live service `casm serve`: batching, refresh, fine-tuning, checkpoints, telemetry."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    recommender: Literal["casm", "popularity", "recent"] = Field(
        "casm", description="'casm': the model (popularity until its first version); 'popularity': the "
        "most-popular baseline; 'recent': the items of the user's window, most recently seen first, "
        "filled with the most popular. Baselines are served through the same path, exclusions "
        "included, and have no model (no training, no test-then-train ranks)."
    )
    poll_timeout_ms: int = Field(50, ge=1, description="Longest wait of one consumer poll.")
    apply_queue_batches: int = Field(
        4, ge=0, description="Decoded polls queued between the polling and the applying thread (backpressure "
        "beyond); 0 applies on the polling thread. The deterministic training mode always applies inline."
    )
    apply_max_events: int = Field(
        20_000, ge=1, description="Events of queued polls applied in one store transaction at most (under a "
        "backlog the transaction's cost is spread over them)."
    )
    top_k: int = Field(10, ge=1, description="Items K per published recommendation.")
    exclude_behaviours: list[str] = Field(
        default_factory=list,
        description="Never recommend items the user already acted on with these behaviours "
        "(within the user's window of model.max_len events), e.g. ['buy']; every list honours it: "
        "the model's, the baselines' and the popularity fallback's.",
    )
    popularity_behaviours: list[str] = Field(
        default_factory=list,
        description="Behaviours counted for popularity (the fallback and the baselines' lists; empty: all).",
    )
    published_record_every_s: float = Field(
        1.0, gt=0, description="Write the users' last published recommendations to the store this often."
    )
    retain_every_s: float = Field(
        300.0, gt=0, description="Apply the store's retention (store.retention_*) and forget expired event ids this often."
    )
    popularity_refresh_s: float = Field(
        5.0, gt=0, description="Recompute the popularity counts (the fallback and the baselines') this often "
        "(at every refresh in the deterministic training mode)."
    )
    publisher_queue_batches: int = Field(
        8, ge=1, description="Applied batches whose signals may wait for the publisher thread before "
        "ingestion waits (backpressure, bounded memory)."
    )
    refresh_max_users: int = Field(256, ge=1, description="Users scored per refresh micro-batch at most.")
    refresh_max_delay_ms: int = Field(
        20, ge=0, description="Refresh touched users at the latest this long after their event was applied."
    )
    training: Literal["continuous", "deterministic"] = Field(
        "continuous", description="'continuous': the trainer process trains whenever its budget "
        "(trainer_cpu_share, trainer_max_steps_per_s) allows, on a replay mix of the newest windows "
        "and a reservoir of older users, and publishes a version every publish_every_steps steps or "
        "publish_every_s seconds; ingestion never waits for it. 'deterministic': every "
        "deterministic_round_events applied events, ingestion waits while the trainer takes exactly "
        "deterministic_steps_per_1000_events steps per 1,000 events and publishes a version, and "
        "batches are cut at fixed event counts: two runs of one log (one partition) agree "
        "(evaluation at full speed; budgets can be compared)."
    )
    min_events_to_train: int = Field(200, ge=1, description="Applied events (in total) before the trainer gets its first data.")
    trainer_cpu_share: float = Field(
        0.5, ge=0.0, description="Continuous mode: CPU seconds the trainer may use per wall second (a "
        "share of one core; it rests after each step to keep to it); 0: no limit."
    )
    trainer_max_steps_per_s: float = Field(
        0.0, ge=0.0, description="Continuous mode: at most this many optimisation steps per second (0: no cap)."
    )
    publish_every_steps: int = Field(100, ge=1, description="Continuous mode: publish a version after this many steps ...")
    publish_every_s: float = Field(5.0, gt=0, description="... or this many wall seconds after the previous version (with at least one step), whichever comes first.")
    feed_every_s: float = Field(
        0.5, gt=0, description="Send the newest windows of the users touched since the last feed to the "
        "trainer this often (continuous mode) ..."
    )
    feed_every_events: int = Field(2_000, ge=1, description="... or after this many applied events.")
    replay_recent_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of each training batch drawn from the newest windows "
        "(the rest from the reservoir of older users)."
    )
    replay_recent_users: int = Field(2_048, ge=1, description="Newest windows the trainer holds (by user, least recently updated dropped first).")
    replay_reservoir_users: int = Field(
        8_192, ge=1, description="Users in the reservoir (a uniform sample of every user seen, each at "
        "its newest window); seeded from the store when the trainer starts."
    )
    deterministic_round_events: int = Field(
        1_000, ge=1, description="Deterministic mode: applied events between two training rounds (versions)."
    )
    deterministic_steps_per_1000_events: float = Field(
        16.0, ge=0.0, description="Deterministic mode: optimisation steps (train.batch_size rows each) per "
        "1,000 applied events."
    )
    trainer_threads: int = Field(1, ge=0, description="torch threads of the trainer process (0: torch default).")
    trainer_niceness: int = Field(
        10, ge=0, le=19, description="How much nicer (lower CPU priority) the trainer process runs than the "
        "service: serving first, training on what is left."
    )
    scoring_threads: int = Field(1, ge=0, description="torch threads of the serving process (0: torch default).")
    checkpoint_dir: Path = Field(Path("var/checkpoints"), description="Where model checkpoints are written.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints kept on disk (older ones are deleted).")
    initial_checkpoint: Path | None = Field(
        None, description="Offline-trained checkpoint to start from when the store has no model yet."
    )
    worker_timeout_s: float = Field(120.0, gt=0, description="Longest wait for the trainer process to answer.")
    trainer_restart_backoff_s: float = Field(
        10.0, gt=0, description="A dead trainer process is restarted (from the newest checkpoint) at most this often."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of the /metrics, /healthz and dashboard (/) server.")
    metrics_port: int | None = Field(9464, ge=0, le=65535, description="Its port (0: a free one; None: off).")
    metrics_rate_window_s: float = Field(10.0, gt=0, description="Window of the events/s gauge.")
    health_max_poll_age_s: float = Field(30.0, gt=0, description="/healthz fails when the loop has not polled for this long.")
    timeline_every_s: float = Field(
        5.0, gt=0, description="Period (seconds) of the dashboard's samples (`consumers/serve/timeline.py`, "
        "`GET /api/timeline`).",
    )
    timeline_points: int = Field(
        720, ge=2, description="Samples the dashboard keeps per series (the oldest dropped first): "
        "timeline_points x timeline_every_s seconds of history in fixed memory.",
    )
    hit_users: int = Field(
        50_000, ge=1, description="Users whose newest acknowledged list is kept for the published HR@K "
        "(least recently published dropped first; `consumers/serve/published_hits.py`).",
    )

    @property
    def has_model(self) -> bool:
        """Whether the recommender is the learned model: fine-tuned on the stream and ranking
        events test-then-train. The baselines ('popularity', 'recent') have none."""
        return self.recommender == "casm"


class ScaleConfig(BaseModel):
    """Scale-out: several `casm serve` instances in one consumer group (README, "Scale-out")."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["all", "ingest", "trainer"] = Field(
        "all",
        description="all: one process does everything (no changelog); ingest: apply, refresh and publish the "
        "partitions assigned, write every state change to `topics.changelog`, serve the models of "
        "`topics.models`; trainer: rebuild the whole state from the changelog, train, watch drift, own alpha "
        "and publish each version to `topics.models`.",
    )
    instance_id: str = Field(
        "", description="Name of this instance in `casm status` and the logs; empty: <host>-<pid>."
    )
    changelog_max_events: int = Field(
        5_000, ge=1, description="Events per changelog record at most (a record stays well below "
        "`kafka.max_request_size`).",
    )
    model_chunk_bytes: int = Field(
        512 * 1024, ge=1024, description="A model version is published in records of this many bytes at most.",
    )
    restore_timeout_s: float = Field(
        300.0, gt=0, description="Longest restore of one partition from its changelog before the instance stops.",
    )
    status_every_s: float = Field(2.0, gt=0, description="Period of the status record each instance publishes.")


class LiveConfig(BaseModel):
    """Running the production path end to end (`casm demo`, `casm evaluate-stream`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    runs_dir: Path = Field(Path("runs"), description="Where each run's folder (state, log, report) is made.")
    demo_events: int = Field(
        40_000, ge=1, description="Events `casm demo` replays: the synthetic stream's length, or the first "
        "this many of a log given with --data (`casm demo --events N`)."
    )
    demo_rate: str = Field(
        "2000/s", description="Replay pace of `casm demo` in events/s, e.g. '2000/s' (`casm demo --rate`; "
        "--speed and --max replace it)."
    )
    clock: Literal["wall", "event_order"] = Field(
        "wall", description="When a list counts as sent before an event: by wall-clock time (what a "
        "user saw; paced streams) or by stream position (what the system had computed; full-speed replays)."
    )
    grace_ms: int = Field(
        2_000, ge=0, description="Wall clock: hold events this long before scoring them against what the "
        "user had been sent (recommendations may arrive a little after events)."
    )
    start_timeout_s: float = Field(180.0, gt=0, description="Longest wait for `casm serve` to get its partitions.")
    stop_timeout_s: float = Field(180.0, gt=0, description="Longest wait for `casm serve` to stop cleanly.")
    drain_timeout_s: float = Field(
        120.0, gt=0, description="After the replay, give up waiting for every user's newest event to be "
        "reflected when no new recommendation arrived for this long."
    )
    sample_every_s: float = Field(1.0, gt=0, description="Progress display and timeline sampling period.")
    freshness_edges_ms: list[float] = Field(
        default_factory=lambda: [0, 50, 100, 200, 500, 1000, 2000, 5000],
        description="Bin edges (ms) of the freshness histogram in reports.",
    )
    rate_window_s: float = Field(5.0, gt=0, description="Window of the events/s shown.")
    lists_per_user: int = Field(
        8, ge=1, description="Published lists kept per user (the newest) to score the user's later events "
        "against: an event whose list was pushed out by newer ones while the event was held (grace_ms) "
        "counts as cold, so keep more than a user receives within grace_ms."
    )
    progress_recent_lists: int = Field(
        5_000, ge=1, description="Freshness shown while running: percentiles of the last this many lists."
    )
    cold_user_events: int = Field(
        3, ge=1, description="Reports split target events of users with fewer earlier events than this."
    )
    window_events: int = Field(
        2_000, ge=1, description="Stream positions per window of the metrics over time (HR@K per window)."
    )


class DriftConfig(BaseModel):
    """Drift detection on the live stream and the alpha re-weighting policy."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = Field(True, description="Score events test-then-train and watch for drift.")
    policy: Literal["fixed", "conversion", "gradient"] = Field(
        "fixed", description="'fixed' (the default: neither adaptive policy helped in BENCHMARKS.md's drift "
        "experiment): never change alpha; 'conversion': re-weight alpha_b from b's conversion after a drift; "
        "'gradient': alpha_b from the cosine similarity of b's loss gradient with the target's "
        "(clipped at 0, smoothed), measured when a detector fires and every gradient_every_steps "
        "trainer steps."
    )
    gradient_every_steps: int = Field(
        500, ge=1, description="Policy 'gradient': trainer steps between two scheduled similarity measurements."
    )
    gradient_rows: int = Field(
        512, ge=1, description="Policy 'gradient': sequences of the replay buffer one similarity measurement uses "
        "(a single batch's cosine is noisy)."
    )
    gradient_smoothing: float = Field(
        0.3, gt=0, le=1, description="Policy 'gradient': step of alpha_b towards each new estimate (1: jump to it)."
    )
    persist_every_s: float = Field(
        30.0, gt=0, description="Save the detectors' and the policy's state to the store this often (and at "
        "shutdown); a restart resumes from the newest save."
    )
    detector: Literal["adwin", "page_hinkley", "kswin"] = Field("adwin", description="River detector.")
    signals: list[Literal["hit", "conversion"]] = Field(
        default_factory=lambda: ["hit", "conversion"], description="Signals watched per behaviour."
    )
    hit_k: int = Field(10, ge=1, description="K of the hit signal (item in the model's top K).")
    horizon_s: float = Field(
        3_600.0, gt=0, description="Conversion horizon H in event time (s): a b-event converts when the "
        "target on the same item by the same user follows within H."
    )
    cooldown_updates: int = Field(
        500, ge=0, description="Updates a (signal, behaviour) detector ignores after it fired."
    )
    settle_outcomes: int = Field(
        150, ge=1, description="Conversion outcomes of b observed after a detection before alpha_b is re-estimated."
    )
    alpha_min: float = Field(0.05, ge=0, description="Lower clip of a re-weighted alpha_b.")
    alpha_max: float = Field(2.0, gt=0, description="Upper clip of a re-weighted alpha_b.")
    smoothing: float = Field(0.5, gt=0, le=1, description="Step towards the new estimate (1: jump to it).")
    sampled_negatives: int = Field(99, ge=1, description="Negatives of the sampled rank of each scored event.")
    score_other_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="Share of non-target events ranked test-then-train (every target "
        "event is): each costs a pass of the model."
    )
    user_share: float = Field(
        0.2, gt=0.0, le=1.0, description="Share of users whose events feed the test-then-train signals and the "
        "detectors, chosen by a hash of the user id seeded by `seed` (a user is in or out for good, so funnels "
        "stay whole and reruns agree). Each scored event costs a pass of the model on the publisher's thread; "
        "1 watches every user (evaluation runs use 1: their test-then-train hit rate is over every target event)."
    )
    score_chunk_events: int = Field(
        256, ge=1, description="Events scored against every item at once (memory: this x items floats)."
    )
    max_pending_per_user_item: int = Field(
        16, ge=1, description="Unresolved b-events kept per (user, item) for the conversion signal."
    )
    adwin_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence delta.")
    adwin_clock: int = Field(16, ge=1, description="ADWIN checks for a change every this many updates.")
    adwin_grace_period: int = Field(30, ge=1, description="ADWIN updates before it may detect.")
    ph_min_instances: int = Field(30, ge=1, description="PageHinkley updates before it may detect.")
    ph_delta: float = Field(0.005, ge=0, description="PageHinkley magnitude of changes tolerated.")
    ph_threshold: float = Field(50.0, gt=0, description="PageHinkley detection threshold (lambda).")
    ph_alpha: float = Field(0.9999, gt=0, le=1, description="PageHinkley forgetting factor.")
    kswin_alpha: float = Field(0.001, gt=0, lt=1, description="KSWIN significance level.")
    kswin_window_size: int = Field(200, ge=10, description="KSWIN window.")
    kswin_stat_size: int = Field(60, ge=5, description="KSWIN recent sub-window.")
    seed: int = Field(0, description="Seed of the sampled negatives and of KSWIN.")

    @model_validator(mode="after")
    def _clip_range(self) -> DriftConfig:
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"drift.alpha_min {self.alpha_min} is above drift.alpha_max {self.alpha_max}")
        return self


class CasmSettings(BaseSettings):
    """All configuration of casm-stream."""

    model_config = SettingsConfigDict(
        env_prefix="CASM_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
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
    serve: ServeConfig = Field(default_factory=ServeConfig)
    live: LiveConfig = Field(default_factory=LiveConfig)
    scale: ScaleConfig = Field(default_factory=ScaleConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _sections_agree(self) -> CasmSettings:
        """Settings of one section that name or must fit another's, checked once at load so a
        mismatch fails with both settings named instead of misbehaving later. (Within a section
        the section checks itself: behaviours.target and the alpha keys in behaviours.names,
        eval.table_k in eval.ks, ...)."""
        names = self.behaviours.names
        problems = []
        if not self.events.open_vocabulary:
            # A typo would otherwise be ignored (exclusions) or fail at the first publish.
            for field in ("exclude_behaviours", "popularity_behaviours"):
                unknown = [b for b in getattr(self.serve, field) if b not in names]
                if unknown:
                    problems.append(f"serve.{field} names {unknown}, not in behaviours.names {names}")
        # The offline split looks these up in the vocabulary the log is encoded with.
        unknown = [b for b in self.eval.validation_behaviours if b not in names]
        if unknown:
            problems.append(f"eval.validation_behaviours names {unknown}, not in behaviours.names {names}")
        # Validation computes HR/NDCG at eval.ks (and MRR), sampled and full; anything else is a
        # KeyError after the first validation.
        metrics = [f"{kind}.{m}" for kind in ("sampled", "full") for m in
                   [*(f"{name}@{k}" for k in self.eval.ks for name in ("hr", "ndcg")), "mrr"]]
        if self.train.early_stopping_metric not in metrics:
            problems.append(
                f"train.early_stopping_metric {self.train.early_stopping_metric!r} is not a validation "
                f"metric of eval.ks {self.eval.ks}: one of {metrics}"
            )
        # The live trainer reads windows of model.max_len + 1 events (input and next event) from the
        # store: a shorter stored sequence silently trains on shorter windows than the model reads.
        if self.store.sequence_length < self.model.max_len + 1:
            problems.append(
                f"store.sequence_length {self.store.sequence_length} is below model.max_len + 1 = "
                f"{self.model.max_len + 1} (the trainer's window: the model's input and the next event)"
            )
        if self.scale.role != "all" and self.serve.training != "continuous":
            # Deterministic rounds count polled records; the trainer's are changelog records of
            # many events, and an ingest instance does not train.
            problems.append(f"scale.role {self.scale.role!r} needs serve.training 'continuous', not "
                            f"{self.serve.training!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
