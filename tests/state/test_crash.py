"""Crash safety: a writer killed with SIGKILL at random moments leaves whole batches, offsets that
match exactly the events held, and replaying from those offsets ends in the same state as a run
that was never killed."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.state import _crash_worker as worker
from tests.state._synth import SyntheticLog, open_store, state_dump

#: Longest wait between the worker's "ready" and the kill (it applies ~5-15 batches meanwhile).
MAX_DELAY_S = 0.12
SEED = 20_240_611


def _args(path: Path, per_partition: int) -> list[str]:
    return ["--path", str(path), "--seed", str(SEED), "--per-partition", str(per_partition)]


def _spawn(path: Path, per_partition: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.state._crash_worker", *_args(path, per_partition)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def check_invariants(path: Path, log: SyntheticLog, sequence_length: int) -> dict:
    """Open the file read-only and check what a crash may never break."""
    with open_store(path, read_only=True, sequence_length=sequence_length) as store:
        offsets = store.all_offsets()
        con = store.con
        held = con.execute(
            'SELECT "partition", "offset" FROM events ORDER BY "partition", "offset"'
        ).fetchall()
        # Offsets match exactly the events held: all of them below the offsets, none above.
        assert held == sorted(log.expected_events(offsets))
        # Only whole batches: every batch's events per partition are all there.
        per_batch = dict(((b, p), n) for b, p, n in con.execute(
            'SELECT batch_seq, "partition", count(*) FROM events GROUP BY ALL').fetchall())
        committed = {(b, p): n for b, p, n in con.execute(
            'SELECT batch_seq, "partition", n_applied FROM commits').fetchall()}
        assert per_batch == {key: n for key, n in committed.items() if n}
        # Sequences, popularity and vocabulary are exactly those of the events held.
        records = log.records
        by_user: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        for p, offset in log.expected_events(offsets):
            r = records[p][offset]
            by_user[r.user_id].append((r.item_id, r.behavior))
        dump = state_dump(store)
        assert {u: list(zip(v[0], v[1], strict=True)) for u, v in dump["users"].items()} == {
            u: s[-sequence_length:] for u, s in by_user.items()}
        assert {u: v[2] for u, v in dump["users"].items()} == {
            u: len(s) for u, s in by_user.items()}
        counts = collections.Counter(item for s in by_user.values() for item, _ in s)
        assert dump["popularity"] == dict(counts)
        assert set(dump["items"]) == set(counts)
        return offsets


@pytest.mark.integration
@pytest.mark.parametrize("kills, per_partition", [
    (20, 4_000),
    pytest.param(100, 20_000, marks=pytest.mark.slow),
])
def test_sigkill_at_random_moments_is_exactly_once(
    tmp_path: Path, kills: int, per_partition: int
) -> None:
    args = worker.parser().parse_args(_args(tmp_path / "crashed.duckdb", per_partition))
    log = worker.log_from(args)
    path = Path(args.path)
    rng = random.Random(SEED)
    kills_wanted, kills = kills, 0
    progress = []
    while kills < kills_wanted:
        proc = _spawn(path, per_partition)
        try:
            line = proc.stdout.readline()
            assert line.strip() == b"ready", (line, proc.stderr.read())
            time.sleep(rng.uniform(0.0, MAX_DELAY_S))
            if proc.poll() is not None:
                break  # it finished the log before we killed it
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        offsets = check_invariants(path, log, args.sequence_length)
        progress.append(sum(offsets.values()))
    assert kills >= kills_wanted, f"the worker finished the log after {kills} kills; make it longer"
    assert progress == sorted(progress) and progress[-1] > progress[0]

    # Resume once more and let it finish: replaying from the stored offsets.
    proc = _spawn(path, per_partition)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    assert out.split() == [b"ready", b"done"]
    final = check_invariants(path, log, args.sequence_length)
    assert final == log.end_offsets()

    # The same log applied by a writer that was never killed.
    reference = worker.parser().parse_args(_args(tmp_path / "reference.duckdb", per_partition))
    worker.run(reference, announce=False)
    with open_store(path, read_only=True, sequence_length=args.sequence_length) as crashed, \
            open_store(reference.path, read_only=True,
                       sequence_length=args.sequence_length) as clean:
        assert state_dump(crashed) == state_dump(clean)
        got = {u: list(zip(v[0], v[1], strict=True)) for u, v in state_dump(clean)["users"].items()}
        assert got == log.expected_sequences(args.sequence_length)
