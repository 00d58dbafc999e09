"""One writer per file: a second writer gets `StoreLockedError` naming the file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from state import StoreLockedError
from tests.conftest import REPO_ROOT
from tests.state._synth import TOPIC, open_store, simple

HOLDER = """
import sys
from tests.state._synth import open_store
store = open_store(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
store.close()
"""

OPENER = """
import sys
from state import StoreLockedError
from tests.state._synth import open_store
try:
    open_store(sys.argv[1], read_only=sys.argv[2] == "ro")
except StoreLockedError as exc:
    print("locked:", exc)
"""


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO_ROOT, env=env,
                            text=True, **kwargs)


@pytest.mark.integration
@pytest.mark.parametrize("read_only", [False, True])
def test_file_written_by_another_process_is_refused_with_its_name(
    tmp_path: Path, read_only: bool
) -> None:
    path = tmp_path / "held.duckdb"
    holder = _python(HOLDER, str(path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError) as info:
            open_store(path, read_only=read_only)
        message = str(info.value)
        assert str(path) in message and "another writer" in message
        assert "PID" in message
        assert info.value.path == str(path)
        assert info.value.__cause__ is None and info.value.__suppress_context__
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert holder.returncode == 0
    with open_store(path) as store:  # free again
        store.apply(simple(["a"], ["x"]))


@pytest.mark.integration
def test_other_process_is_refused_while_we_write(tmp_path: Path) -> None:
    path = tmp_path / "ours.duckdb"
    with open_store(path) as store:
        store.apply(simple(["a"], ["x"]), {(TOPIC, 0): 1})
        for mode in ("rw", "ro"):
            opener = _python(OPENER, str(path), mode, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
            out, err = opener.communicate(timeout=60)
            assert opener.returncode == 0, err
            assert out.startswith("locked:") and str(path) in out


def test_second_writer_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with open_store(path):
        with pytest.raises(StoreLockedError, match="in this process"):
            open_store(path)
        with pytest.raises(StoreLockedError, match=str(path)):
            open_store(path, read_only=True)
    with open_store(path):  # released on close
        pass


def test_failed_open_releases_the_writer_slot(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    open_store(path, behaviours=["pv"]).close()
    with pytest.raises(Exception, match="numbers behaviours"):
        open_store(path, behaviours=["buy"])
    open_store(path, behaviours=["pv"]).close()
