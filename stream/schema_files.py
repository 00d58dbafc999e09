"""The published JSON Schemas of our messages (``stream/schemas/*.json``), generated from the
pydantic models so that other teams can produce to `behaviours` and read `recommendations` and
`behaviours.dlq` in any language. ``casm schemas`` rewrites them; a unit test fails when the
committed files differ from what the models generate.

The committed schemas use the default limits and an open behaviour vocabulary (the vocabulary is
a deployment setting); ``casm schemas --deployment --out DIR`` writes a deployment's own variant.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stream.config import EventLimits
from stream.models import DeadLetter, Recommendation, behaviour_event_model

SCHEMA_DIR = Path(__file__).parent / "schemas"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_VERSION = 1
"""Bumped when a message changes incompatibly (part of each schema's $id)."""

FILE_NAMES = {
    "behaviour_event": "behaviour_event.schema.json",
    "recommendation": "recommendation.schema.json",
    "dead_letter": "dead_letter.schema.json",
}


def _with_header(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": f"urn:casm-stream:schema:{name}:v{SCHEMA_VERSION}",
        **schema,
    }


def json_schemas(
    limits: EventLimits | None = None, vocabulary: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema. Events in validation mode (what producers may send),
    recommendations and dead letters in serialization mode (what we write)."""
    event_model = behaviour_event_model(limits or EventLimits(), vocabulary)
    return {
        FILE_NAMES["behaviour_event"]: _with_header(event_model.model_json_schema(mode="validation"), "behaviour_event"),
        FILE_NAMES["recommendation"]: _with_header(
            Recommendation.model_json_schema(mode="serialization"), "recommendation"
        ),
        FILE_NAMES["dead_letter"]: _with_header(DeadLetter.model_json_schema(mode="serialization"), "dead_letter"),
    }


def render(schema: dict[str, Any]) -> str:
    """The file text of a schema (stable: same models, same bytes)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write_schemas(
    directory: str | Path = SCHEMA_DIR,
    limits: EventLimits | None = None,
    vocabulary: Sequence[str] | None = None,
) -> list[Path]:
    """Write every schema into `directory`; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas(limits, vocabulary).items():
        path = directory / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(directory: str | Path = SCHEMA_DIR) -> list[str]:
    """Names of the default schema files in `directory` that are missing or differ from the models."""
    directory = Path(directory)
    stale = []
    for name, schema in json_schemas().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(schema):
            stale.append(name)
    return stale
