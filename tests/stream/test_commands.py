"""The stream commands of the CLI: casm schemas, casm replay, casm broker."""

from __future__ import annotations

import json

import pytest

from consumers.cli import main
from stream.clients import read_topic


def topic_options(topics) -> list[str]:
    return [
        "--topics.behaviours", topics.behaviours,
        "--topics.recommendations", topics.recommendations,
        "--topics.dead-letters", topics.dead_letters,
    ]


def test_schemas_check_passes_on_the_committed_files(capsys):
    assert main(["schemas", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_schemas_deployment_variant(tmp_path, capsys):
    assert main(["schemas", "--deployment", "--out", str(tmp_path),
                 "--behaviours.names", "like,dislike", "--behaviours.target", "like",
                 "--behaviours.alpha", "{}"]) == 0
    schema = json.loads((tmp_path / "behaviour_event.schema.json").read_text())
    assert schema["properties"]["behavior"]["enum"] == ["like", "dislike"]
    assert main(["schemas", "--deployment"]) == 2


def test_replay_needs_a_broker(monkeypatch, tmp_path):
    monkeypatch.delenv("CASM_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    assert main(["replay", "--synthetic", "--events", "10"]) == 2


@pytest.mark.integration
def test_replay_synthetic(kafka_bootstrap, topic_names, capsys):
    code = main(["replay", "--synthetic", "--events", "300", "--seed", "5", "--rate", "100000/s", "--json",
                 "--kafka.bootstrap-servers", kafka_bootstrap, "--progress", "false",
                 "--synthetic.n-users", "20", "--synthetic.n-items", "50", *topic_options(topic_names)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sent"] == 300 and report["synthetic"] and report["source"] == "synthetic-seed5"
    from stream.testing import kafka_test_config

    records = read_topic(kafka_test_config(), kafka_bootstrap, topic_names.behaviours, expected=300)
    assert len(records) == 300
    assert all(json.loads(r.value)["context"] == {"synthetic": True} for r in records)


@pytest.mark.integration
def test_replay_log_file_with_limit(kafka_bootstrap, topic_names, tmp_path, capsys):
    path = tmp_path / "UserBehavior.csv"
    path.write_text("".join(f"{i % 4},{i},7,{['pv', 'buy'][i % 2]},{1_511_000_000 + i}\n" for i in range(50)))
    code = main(["replay", "--data", str(path), "--format", "taobao", "--limit", "30", "--max",
                 "--kafka.bootstrap-servers", kafka_bootstrap, "--progress", "false",
                 *topic_options(topic_names)])
    assert code == 0
    out = capsys.readouterr().out
    assert "sent        30 of 30 events" in out and "SYNTHETIC" not in out


@pytest.mark.integration
def test_broker_command_runs_and_stops(capsys):
    assert main(["broker", "--duration", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "listening on 127.0.0.1:" in out and "IN MEMORY ONLY" in out and "broker stopped" in out
