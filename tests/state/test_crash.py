"""Crash safety: a writer killed with SIGKILL at random moments leaves whole batches, offsets that
match exactly the events held, and replaying from those offsets ends in the same state as a run
that was never killed.

The kills are paced by what the writer reports, not by the clock: after a random number of
committed batches (its "applied" lines) the parent waits a random share of the writer's own
last batch interval and kills it, so every kill lands mid-way through the work of a batch and
after real progress, however fast or slow the machine. Deadlines only bound a hung writer."""

from __future__ import annotations

import collections
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.state import _crash_worker as worker
from tests.state._synth import SyntheticLog, open_store, state_dump

#: Most batches a writer commits (after "ready") before it is killed; the log holds ~50 batches per
#: 1,000 records of a partition, so 20 kills of 4,000 per partition leave most of it to resume.
MAX_BATCHES_PER_KILL = 8
#: How long the writer may take for one line (it starts Python and DuckDB before "ready"): only a
#: hung writer is that slow.
LINE_DEADLINE_S = 120.0
#: How long the last, uninterrupted run may take to finish the log.
FINISH_DEADLINE_S = 600.0
SEED = 20_240_611


def _args(path: Path, per_partition: int) -> list[str]:
    return ["--path", str(path), "--seed", str(SEED), "--per-partition", str(per_partition)]


def _spawn(path: Path, per_partition: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(  # unbuffered stdout: `_line` selects on its descriptor
        [sys.executable, "-m", "tests.state._crash_worker", *_args(path, per_partition)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )


def _line(proc: subprocess.Popen[bytes]) -> bytes:
    """The writer's next line without its newline (b"" once it exited); fails after
    `LINE_DEADLINE_S` without one."""
    line = b""
    deadline = time.monotonic() + LINE_DEADLINE_S
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        if not ready:
            pytest.fail(f"the crash worker wrote no line within {LINE_DEADLINE_S} s (got {line!r})")
        byte = proc.stdout.read(1)
        if not byte:
            break
        line += byte
    return line.strip()


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
            line = _line(proc)
            assert line == b"ready", (line, proc.stderr.read())
            line, seen_at = b"", []
            for _ in range(rng.randint(1, MAX_BATCHES_PER_KILL)):
                line = _line(proc)
                if line != b"applied":
                    break
                seen_at.append(time.monotonic())
            if line != b"applied":
                break  # it finished the log before we killed it
            interval = seen_at[-1] - seen_at[-2] if len(seen_at) > 1 else 0.0
            time.sleep(rng.uniform(0.0, interval))  # somewhere inside the next batch's work
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
    # Every kill came after at least one committed batch: the stored offsets grew each time.
    assert progress[0] > 0 and all(a < b for a, b in zip(progress, progress[1:], strict=False)), progress

    # Resume once more and let it finish: replaying from the stored offsets.
    proc = _spawn(path, per_partition)
    out, err = proc.communicate(timeout=FINISH_DEADLINE_S)
    assert proc.returncode == 0, err.decode()
    lines = out.split()
    assert lines[0] == b"ready" and lines[-1] == b"done" and set(lines[1:-1]) <= {b"applied"}
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
