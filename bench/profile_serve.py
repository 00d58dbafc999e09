"""Where `casm serve`'s threads spend their time, sampled by py-spy (not a project dependency:
``pip install py-spy``; it needs permission to read the process, e.g. root or ptrace allowed).

    .venv/bin/python bench/profile_serve.py ingest --mode gil     # who holds the interpreter
    .venv/bin/python bench/profile_serve.py ingest --mode idle    # where each thread waits too
    .venv/bin/python bench/profile_serve.py freshness --rate 2000 --mode idle

- ingest: the `bench_serve.py ingest` set-up (a backlog of synthetic events, then `casm serve`),
  sampled from assignment until everything is applied.
- freshness: a paced `run_live` as `bench_serve.py freshness`, sampled for `--seconds` from
  `--after-s` into the run.

Prints each thread's share of the samples and its most frequent innermost frames (`--frames`
deep); the raw py-spy output is kept at --raw. BENCHMARKS.md quotes it with the command.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import produce, raw_consume_rate, settings_for  # noqa: E402

import consumers.evaluation.live as live  # noqa: E402
from stream.broker import EmbeddedBroker  # noqa: E402
from stream.config import BrokerConfig, SyntheticConfig  # noqa: E402
from stream.replay import parse_pacing  # noqa: E402
from stream.synthetic import generate  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402

SAMPLES_PER_S = 200


def spy(pid: int, raw: Path, mode: str, seconds: float | None = None) -> subprocess.Popen:
    """py-spy recording the threads of process `pid` into `raw` (py-spy's collapsed stacks)."""
    binary = shutil.which("py-spy")
    if binary is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    command = [binary, "record", "-p", str(pid), "-r", str(SAMPLES_PER_S), "-f", "raw", "-o", str(raw),
               "--threads", "--nonblocking", f"--{mode}"]
    if seconds is not None:
        command += ["-d", str(int(seconds))]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def profile_ingest(args: argparse.Namespace) -> None:
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        settings = settings_for(folder, broker.bootstrap)
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        produce(settings, broker.bootstrap, generate(SyntheticConfig(n_events=args.events, seed=1)).events)
        raw = raw_consume_rate(settings, broker.bootstrap, args.events)
        serve = live.ServeProcess(settings, folder / "serve.log")
        serve.wait_assigned(300)
        recorder = spy(serve.process.pid, args.raw, args.mode)
        started, applied = time.perf_counter(), 0.0
        while applied < args.events:
            time.sleep(0.5)
            applied = serve.metrics().get("casm_events_applied_total", 0.0)
        seconds = time.perf_counter() - started
        recorder.send_signal(2)
        recorder.wait(60)
        serve.stop(300)
    print(f"ingest {args.events / seconds:,.0f} ev/s, raw consume {raw:,.0f} ev/s (sampled: slower than unsampled)")


def profile_freshness(args: argparse.Namespace) -> None:
    recorders: list[subprocess.Popen] = []
    start = live.ServeProcess.__init__

    def started(self, *a, **k) -> None:  # sample the service the harness starts
        start(self, *a, **k)
        pid = self.process.pid
        threading.Timer(args.after_s, lambda: recorders.append(spy(pid, args.raw, args.mode, args.seconds))).start()

    live.ServeProcess.__init__ = started
    with TemporaryDirectory() as tmp, EmbeddedBroker(BrokerConfig()) as broker:
        folder = Path(tmp)
        settings = settings_for(folder, broker.bootstrap)
        ensure_topics(broker.bootstrap, settings.kafka, settings.topics)
        events = generate(SyntheticConfig(n_events=args.events, seed=2)).events
        result = live.run_live(settings, broker.bootstrap, events, parse_pacing(None, f"{args.rate}/s", False),
                               folder, "profile", progress=False)
    for recorder in recorders:
        recorder.wait(args.seconds + 30)
    print(f"freshness p99 {result.prequential.get('freshness_p99_ms', float('nan')):.0f} ms (sampled)")


def summarize(raw: Path, frames: int, most: int) -> None:
    """Each thread's share of the samples and its most frequent innermost `frames` frames."""
    by_thread: collections.Counter[str] = collections.Counter()
    stacks: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        parts = stack.split(";")
        thread = parts[0].split(":")[-1].strip() or parts[0]
        by_thread[thread] += int(count)
        stacks[thread][" > ".join(p.split(" (")[0] for p in parts[-frames:])] += int(count)
    total = sum(by_thread.values()) or 1
    for thread, count in by_thread.most_common(8):
        print(f"{count / total:6.1%}  {thread}  ({count} samples)")
        for frame, n in stacks[thread].most_common(most):
            print(f"        {n / count:6.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ingest", "freshness"])
    parser.add_argument("--mode", choices=["gil", "idle"], default="gil",
                        help="gil: only samples holding the interpreter; idle: waiting threads too")
    parser.add_argument("--events", type=int, default=None, help="[ingest 200000, freshness 60000]")
    parser.add_argument("--rate", type=int, default=2000, help="freshness: events/s")
    parser.add_argument("--after-s", type=float, default=12.0, help="freshness: start sampling this late")
    parser.add_argument("--seconds", type=float, default=15.0, help="freshness: sample this long")
    parser.add_argument("--frames", type=int, default=3, help="innermost frames shown per stack")
    parser.add_argument("--most", type=int, default=8, help="stacks shown per thread")
    parser.add_argument("--raw", type=Path, default=Path("profile_serve.raw"), help="py-spy's raw output")
    args = parser.parse_args()
    args.events = args.events or (200_000 if args.what == "ingest" else 60_000)
    (profile_ingest if args.what == "ingest" else profile_freshness)(args)
    summarize(args.raw, args.frames, args.most)


if __name__ == "__main__":
    main()
