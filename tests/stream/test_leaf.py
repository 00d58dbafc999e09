"""`stream` is a leaf: importing all of it pulls in neither casm_core, state nor consumers."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.integration  # runs a Python process
def test_stream_imports_no_other_package():
    code = (
        "import importlib, pkgutil, sys, stream\n"
        "for m in pkgutil.iter_modules(stream.__path__):\n"
        "    importlib.import_module('stream.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('casm_core', 'state', 'consumers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
