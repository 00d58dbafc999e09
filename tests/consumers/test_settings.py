"""Where a setting's value comes from, through the real command-line parser: defaults < a
command's profile < preset TOML < ``CASM_`` environment < command line, merged per field; and the
checks between sections, each failing at load with a message that names both settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumers.cli.commands.evaluate_stream import FULL_SPEED
from consumers.cli.main import build_parser, command_settings, main
from consumers.settings import CasmSettings

DEFAULT_MAX_STEPS = CasmSettings.model_fields["train"].default_factory().max_steps


@pytest.fixture(autouse=True)
def _no_casm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the variables a test sets (CASM_DATA_DIR is the tests' own, not a setting)."""
    import os

    for name in list(os.environ):
        if name.startswith("CASM_") and name != "CASM_DATA_DIR":
            monkeypatch.delenv(name)


def settings_of(*argv: str):
    return command_settings(build_parser().parse_args(list(argv)))[0]


def preset(tmp_path: Path, text: str) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(text)
    return str(path)


def test_each_source_overrides_the_ones_below_it_for_a_nested_field(tmp_path: Path, monkeypatch) -> None:
    toml = preset(tmp_path, "[train]\nmax_steps = 1000\n")
    assert settings_of("recommend", "--user", "u").train.max_steps == DEFAULT_MAX_STEPS == 3000
    assert settings_of("recommend", "--user", "u", "--preset", toml).train.max_steps == 1000
    monkeypatch.setenv("CASM_TRAIN__MAX_STEPS", "700")
    assert settings_of("recommend", "--user", "u", "--preset", toml).train.max_steps == 700
    assert settings_of("recommend", "--user", "u", "--preset", toml, "--train.max-steps", "500").train.max_steps == 500


def test_sources_merge_per_field_within_a_section(tmp_path: Path, monkeypatch) -> None:
    """A field from one source leaves the section's other fields to the sources below."""
    toml = preset(tmp_path, "[train]\nmax_steps = 1000\npatience_steps = 300\nvalidate_every_steps = 30\n")
    monkeypatch.setenv("CASM_TRAIN__PATIENCE_STEPS", "200")
    train = settings_of("recommend", "--user", "u", "--preset", toml, "--train.validate-every-steps", "20").train
    assert (train.max_steps, train.patience_steps, train.validate_every_steps, train.batch_size) == (1000, 200, 20, 128)


def test_the_max_profile_applies_below_every_explicit_setting(tmp_path: Path, monkeypatch) -> None:
    base = ("evaluate-stream", "--data", str(tmp_path / "log.csv"))
    profiled = settings_of(*base)  # no pace given: full speed, the profile applies
    assert (profiled.serve.training, profiled.topics.partitions, profiled.live.clock) == ("deterministic", 1, "event_order")
    assert profiled.kafka.max_poll_records == 20 and profiled.serve.publisher_queue_batches == 1

    monkeypatch.setenv("CASM_SERVE__TRAINING", "continuous")
    toml = preset(tmp_path, "[live]\nclock = \"wall\"\n")
    explicit = settings_of(*base, "--max", "--preset", toml, "--topics.partitions", "3", "--kafka.max-poll-records", "100")
    assert explicit.serve.training == "continuous"  # environment over the profile
    assert explicit.live.clock == "wall"  # preset over the profile
    assert explicit.topics.partitions == 3 and explicit.kafka.max_poll_records == 100  # command line over it
    assert explicit.serve.refresh_max_delay_ms == 0  # what nothing explicit replaced still applies

    paced = settings_of(*base, "--rate", "100/s")  # paced: only the evaluation profile
    assert (paced.live.clock, paced.topics.partitions, paced.kafka.max_poll_records) == ("wall", 4, 2000)
    assert paced.drift.user_share == 1.0 and settings_of("serve").drift.user_share < 1.0
    assert settings_of(*base, "--rate", "100/s", "--drift.user-share", "0.5").drift.user_share == 0.5


def test_the_profile_reports_what_it_applied_and_what_was_replaced(tmp_path: Path) -> None:
    settings = settings_of("evaluate-stream", "--data", str(tmp_path / "log.csv"), "--partitions", "2")
    applied, replaced = FULL_SPEED.outcome(settings)
    assert replaced == {"topics.partitions": 2}
    assert set(applied) == set(FULL_SPEED.values()) - {"topics.partitions"}
    assert "--serve.training 'deterministic'" in FULL_SPEED.help_text()


def test_the_profile_is_logged_at_start(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="casm")
    missing = tmp_path / "absent.csv"
    with pytest.raises(FileNotFoundError):
        main(["evaluate-stream", "--data", str(missing), "--clock", "wall", "--progress", "false"])
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("profile "))
    assert "evaluate-stream --max" in line and "'serve.training': 'deterministic'" in line
    assert "replaced by explicit settings {'live.clock': 'wall'}" in line


@pytest.mark.parametrize(
    ("argv", "path", "value"),
    [
        (("recommend", "--user", "u", "--k", "3"), "serve.top_k", 3),
        (("evaluate", "--target", "cart"), "behaviours.target", "cart"),
        (("demo", "--events", "123", "--rate", "50/s"), "live.demo_events", 123),
        (("demo", "--rate", "50/s"), "live.demo_rate", "50/s"),
        (("replay", "--synthetic", "--seed", "5", "--events", "300"), "synthetic.seed", 5),
        (("replay", "--synthetic", "--events", "300"), "synthetic.n_events", 300),
        (("replay", "--synthetic", "--topic", "other"), "topics.behaviours", "other"),
        (("evaluate-stream", "--synthetic", "--policy", "gradient"), "drift.policy", "gradient"),
        (("evaluate-stream", "--synthetic", "--recommender", "recent"), "serve.recommender", "recent"),
        (("evaluate-stream", "--synthetic", "--rate", "9/s", "--training", "deterministic"), "serve.training", "deterministic"),
        (("evaluate-stream", "--synthetic", "--rate", "9/s", "--clock", "event_order"), "live.clock", "event_order"),
        (("evaluate-stream", "--synthetic", "--partitions", "7"), "topics.partitions", 7),
    ],
)
def test_short_flags_write_their_setting(argv: tuple[str, ...], path: str, value) -> None:
    node = settings_of(*argv)
    for part in path.split("."):
        node = getattr(node, part)
    assert node == value


def test_a_short_flag_names_its_setting_in_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["recommend", "--help"])
    assert "shortcut for --serve.top-k" in " ".join(capsys.readouterr().out.split())


def test_a_short_flag_is_validated_as_its_setting(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--user", "u", "--k", "0"])
    assert exit_.value.code == 2
    assert "serve.top_k" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"serve": {"exclude_behaviours": ["bought"]}}, "serve.exclude_behaviours names ['bought'], not in behaviours.names"),
        ({"eval": {"validation_behaviours": ["click"]}}, "eval.validation_behaviours names ['click'], not in behaviours.names"),
        ({"train": {"early_stopping_metric": "full.ndcg@50"}}, "train.early_stopping_metric 'full.ndcg@50' is not a validation metric of eval.ks [5, 10, 20]"),
        ({"store": {"sequence_length": 30}}, "store.sequence_length 30 is below model.max_len + 1 = 51"),
        ({"drift": {"alpha_min": 3.0}}, "drift.alpha_min 3.0 is above drift.alpha_max 2.0"),
        ({"kafka": {"heartbeat_interval_ms": 10_000}}, "kafka.heartbeat_interval_ms 10000 must be below kafka.session_timeout_ms 10000"),
        ({"behaviours": {"target": "click"}}, "target behaviour 'click' is not among"),
        ({"behaviours": {"alpha": {"click": 1.0}}}, "alpha names behaviours that are not in the vocabulary: ['click']"),
        ({"scale": {"role": "trainer"}, "serve": {"training": "deterministic"}},
         "scale.role 'trainer' needs serve.training 'continuous', not 'deterministic'"),
    ],
)
def test_settings_that_disagree_fail_at_load_naming_both(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("+", r"\+")):
        CasmSettings(**overrides)


def test_settings_that_agree_load() -> None:
    settings = CasmSettings(
        store={"sequence_length": 11}, model={"max_len": 10}, eval={"ks": [5, 50], "table_k": 5,
                                                                    "validation_behaviours": ["cart"]},
        train={"early_stopping_metric": "full.ndcg@50"}, serve={"exclude_behaviours": ["buy"]},
    )
    assert settings.store.sequence_length == settings.model.max_len + 1


def test_a_disagreement_on_the_command_line_exits_2_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["recommend", "--user", "u", "--model.max-len", "80"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("casm: invalid settings:") and "store.sequence_length 64 is below model.max_len + 1 = 81" in err


def test_every_shipped_preset_loads(tmp_path: Path) -> None:
    from consumers.presets import available_presets, load_settings

    for name in available_presets():
        assert load_settings(name).behaviours.target in load_settings(name).behaviours.names
