"""The store is a composition: no mixins, and no module of `state` reads another object's
private attributes (only its own, through `self` or `cls`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import state

MODULES = sorted(Path(state.__file__).parent.glob("*.py"))


def _private_reads(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_reads_another_objects_private_fields(path: Path) -> None:
    assert _private_reads(ast.parse(path.read_text())) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_mixins(path: Path) -> None:
    tree = ast.parse(path.read_text())
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert not [c.name for c in classes if "Mixin" in c.name or any(
        "Mixin" in ast.unparse(b) for b in c.bases)]
