"""`casm_core`, `state` and `stream` are leaves: importing all of one pulls in none of the others,
nor `consumers`."""

from __future__ import annotations

import subprocess
import sys

import pytest

LEAVES = ("casm_core", "state", "stream")


@pytest.mark.integration  # runs a Python process per leaf
@pytest.mark.parametrize("leaf", LEAVES)
def test_a_leaf_imports_no_other_package(leaf: str) -> None:
    others = tuple(p for p in (*LEAVES, "consumers") if p != leaf)
    code = (
        f"import importlib, pkgutil, sys, {leaf}\n"
        f"for m in pkgutil.iter_modules({leaf}.__path__):\n"
        f"    importlib.import_module('{leaf}.' + m.name)\n"
        f"bad = sorted(n for n in sys.modules if n.split('.')[0] in {others!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{leaf} imports {out.stdout.strip()}"
