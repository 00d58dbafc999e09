"""The published JSON Schemas match the models (regenerate with `casm schemas`)."""

from __future__ import annotations

import json

from stream.config import EventLimits
from stream.schema_files import SCHEMA_DIR, json_schemas, stale_schemas, write_schemas


def test_committed_schemas_are_current():
    stale = stale_schemas(SCHEMA_DIR)
    assert not stale, f"out of date: {stale}; run `casm schemas` and commit stream/schemas/"


def test_event_schema_states_the_contract():
    schema = json.loads((SCHEMA_DIR / "behaviour_event.schema.json").read_text())
    assert schema["$schema"].endswith("2020-12/schema")
    assert schema["required"] == ["user_id", "item_id", "behavior", "timestamp"]
    assert schema["additionalProperties"] is False
    user = schema["properties"]["user_id"]["anyOf"]
    assert {"type": "string", "minLength": 1, "maxLength": 128} in user
    assert any(branch.get("type") == "integer" and branch["minimum"] == 0 for branch in user)
    dead = json.loads((SCHEMA_DIR / "dead_letter.schema.json").read_text())
    assert dead["properties"]["original"]["contentEncoding"] == "base64"


def test_deployment_variant_has_the_vocabulary(tmp_path):
    write_schemas(tmp_path, EventLimits(max_id_length=64), ["like", "dislike"])
    schema = json.loads((tmp_path / "behaviour_event.schema.json").read_text())
    assert schema["properties"]["behavior"]["enum"] == ["like", "dislike"]
    assert stale_schemas(tmp_path) == ["behaviour_event.schema.json"]
    assert set(json_schemas()) == {p.name for p in SCHEMA_DIR.glob("*.json")}
