"""Child process of the crash test (`python -m tests.state._crash_worker --path ...`).

Opens the store, first re-sends events it already holds (as Kafka does when the committed
offsets lag the store's), prints "ready", then applies the synthetic log's batches from the
store's own offsets until the log is exhausted, printing "applied" after each batch is committed,
and prints "done". The parent kills it with SIGKILL at random moments, paced by those lines.
"""

from __future__ import annotations

import argparse
import sys

from tests.state._synth import SyntheticLog, open_store


def log_from(args: argparse.Namespace) -> SyntheticLog:
    return SyntheticLog(seed=args.seed, partitions=args.partitions,
                        per_partition=args.per_partition)


def run(args: argparse.Namespace, *, announce: bool) -> None:
    log = log_from(args)
    store = open_store(args.path, sequence_length=args.sequence_length,
                       fold_events=args.fold_events, checkpoint_threshold="32KB")
    stored = store.all_offsets()
    if stored:
        # Redelivery of records below the stored offsets: all of it must be dropped.
        older = {key: max(0, value - args.redeliver) for key, value in stored.items()}
        batch = log.poll(older)
        if batch is not None:
            events, nxt = batch
            keep = [k for k in range(events.num_rows)
                    if events.column("offset")[k].as_py()
                    < stored[("behaviours", events.column("partition")[k].as_py())]]
            capped = {key: min(value, stored.get(key, 0)) for key, value in nxt.items()}
            result = store.apply(events.take(keep), capped)
            if result.applied or result.batch_seq is not None:
                raise SystemExit(f"redelivered events were applied: {result}")
    if announce:
        print("ready", flush=True)
    while (batch := log.poll(store.all_offsets())) is not None:
        store.apply(*batch)
        if announce:
            print("applied", flush=True)  # the batch is committed: the parent paces its kills by these
    store.close()
    if announce:
        print("done", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--path", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--per-partition", type=int, default=4_000)
    p.add_argument("--sequence-length", type=int, default=8)
    p.add_argument("--fold-events", type=int, default=400)
    p.add_argument("--redeliver", type=int, default=30)
    return p


if __name__ == "__main__":
    run(parser().parse_args(sys.argv[1:]), announce=True)
