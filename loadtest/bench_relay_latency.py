"""Benchmark: commit -> append latency of paced saves with the relay thread in the process.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_relay_latency.py [--rate 100]
        [--saves 300] [--rounds 6]

The relay's gather window widens with how busy the rest of its process is
(``relay.BUSY_WINDOW``): that must not delay entries of a process that saves at a modest
rate. This saves ``twitter.Tweet`` rows one at a time at ``--rate`` per second (Poisson
arrivals) in Django's autocommit, the relay thread of this process moving them, in rounds
that alternate the window on and off (the A/B baseline in the same run), and prints per
variant the commit -> append p50/p90/p99 (each entry's stream id, Redis's millisecond, against
the wall clock after its save returned: true to ~1 ms) and the load the window saw
(``ProcessLoad``, the share of a core used by the rest of the process). The database:
``DATABASE_URL`` or the example's SQLite, a fresh test database dropped at the end.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_ingest import (  # noqa: E402
    delete_keys,
    drop_database,
    redis_client,
    setup_django,
)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=100.0, help="saves per second")
    p.add_argument("--saves", type=int, default=300, help="saves per round")
    p.add_argument("--rounds", type=int, default=6, help="rounds, alternating the window")
    return p.parse_args()


def run_round(count: int, rate: float, rng: random.Random) -> dict[str, float]:
    """``count`` paced saves; each one's pk and wall-clock time after its save returned."""
    from twitter.models import Tweet

    committed: dict[str, float] = {}
    due = time.monotonic()
    for i in range(count):
        due += rng.expovariate(rate)
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        row = Tweet(author=f"lat{i % 20}", text="a paced tweet")
        row.save()
        committed[str(row.pk)] = time.time()
    return committed


def appended_ms(client: Any, prefix: str) -> dict[str, int]:
    """Each stream entry's pk and its stream id's millisecond."""
    from scalepub.envelope import decode
    from scalepub.sharding import ENTRY_FIELD, Keys

    out: dict[str, int] = {}
    for key in client.scan_iter(match=Keys(prefix).stream_pattern, count=1000):
        for sid, fields in client.xrange(key):
            out[decode(fields[ENTRY_FIELD]).pk] = int(sid.split(b"-")[0])
    return out


def main() -> int:
    """Set up, alternate the rounds, report, clean up."""
    args = parse_args()
    prefix = f"bench-relay-latency-{uuid.uuid4().hex[:12]}"
    database = setup_django(prefix, "thread")
    client = redis_client()
    from scalepub.django import relay

    loads: list[float] = []
    gap = relay.round_gap

    def recorded(took: float, busy: float = 0.0) -> float:
        loads.append(busy)
        return gap(took, busy)

    relay.round_gap = recorded
    rng = random.Random(1)
    committed: dict[bool, dict[str, float]] = {True: {}, False: {}}
    seen: dict[bool, list[float]] = {True: [], False: []}
    try:
        run_round(20, args.rate, rng)  # warm-up: the relay thread starts and leads
        for r in range(args.rounds):
            on = r % 2 == 0
            relay.BUSY_WINDOW = on
            del loads[:]
            committed[on].update(run_round(args.saves, args.rate, rng))
            seen[on] += [x for x in loads if on]
        time.sleep(1.0)
        landed = appended_ms(client, prefix)
        print(f"\n{database}; {args.rate:g} saves/s (Poisson), {args.rounds} rounds x "
              f"{args.saves}, alternating\n")
        print("| window | entries | commit -> append p50 (ms) | p90 | p99 | load seen p50 | max |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for on in (True, False):
            waits = sorted(max(landed[pk] - t * 1000, 0.0) for pk, t in committed[on].items())
            load = seen[on] or [0.0]
            print(f"| {'busy-aware' if on else 'blind (before)'} | {len(waits)} "
                  f"| {waits[len(waits) // 2]:.2f} | {waits[int(len(waits) * 0.9)]:.2f} "
                  f"| {waits[int(len(waits) * 0.99)]:.2f} | {statistics.median(load):.3f} "
                  f"| {max(load):.3f} |")
        missing = sum(1 for c in committed.values() for pk in c if pk not in landed)
        print(f"\nentries missing in Redis: {missing}")
        return 1 if missing else 0
    finally:
        from scalepub.django import producer

        producer.reset()
        delete_keys(client, prefix)
        drop_database()


if __name__ == "__main__":
    sys.exit(main())
