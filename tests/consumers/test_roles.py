"""The role packages of consumers/ depend one way: `cli` on everything, `evaluation` on `serve`
(it starts the service) and below, `serve` on `adapt` and `training`, and those two on neither
(nor on each other). Shared parts (settings, presets, telemetry) sit at the top of consumers/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CONSUMERS = Path(__file__).resolve().parents[2] / "consumers"
ALLOWED = {
    "adapt": set(),
    "training": set(),
    "serve": {"adapt", "training"},
    "evaluation": {"serve", "adapt", "training"},
    "cli": {"serve", "adapt", "training", "evaluation"},
}


def imported_roles(package: str) -> set[str]:
    found = set()
    for path in (CONSUMERS / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "consumers" and parts[1] in ALLOWED and parts[1] != package:
                    found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_role_packages_import_only_downwards(package: str) -> None:
    assert imported_roles(package) <= ALLOWED[package], imported_roles(package) - ALLOWED[package]
