"""Benchmark: what ``scalepub.register`` adds to a Django save, plain vs registered, one run.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_ingest.py [--saves N] [--rounds R]

What: the median wall time of one ``Tweet(...).save()`` of the example project (a created row,
SQLite (WAL) in Django's default autocommit mode, so every save is its own committed INSERT)
with the model unregistered ("plain") and registered with its original per-author node, in
both delivery modes: "outbox" (the default: post_save -> Django XML serializer -> one more
INSERT in the same transaction; the relay thread of this same process moves rows to Redis
concurrently, so its cost shows up here too) and "direct" (on_commit -> serializer -> one
EVALSHA to Redis). The ratio of each median to plain's is the number to watch; the target is
<= 1.3.

How: Django is configured here (``exampleproject.settings``, DEBUG off so query logging does
not pad both sides) with a fresh temporary SQLite file and a unique ``SCALEPUB_KEY_PREFIX``.
After a warm-up in every mode (connections, Lua script load, imports), R rounds of N saves
cycle plain, outbox, direct, plain, ... so drift on a noisy machine hits all modes alike;
each save is timed alone with ``time.perf_counter_ns`` (the instance is built outside the
timer). Median and p90 are over all saves of a mode. Afterwards the stream entries under the
prefix are counted (once the relay emptied the outbox): they must equal the registered saves,
else a registered path is broken
and the script exits 1. Otherwise it exits 0 whether the target was met or not. The Redis
keys under the prefix and the database file are removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3
AUTHORS = [f"bench{i}" for i in range(64)]
TEXT = "a benchmark tweet of a realistic size, some words, a link https://example.com/x/y"


@dataclass
class Mode:
    """One side of the comparison and the per-save times it collected (ns)."""

    name: str
    activate: Callable[[], None]
    times: list[int] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)
    saves: int = 0  # every save in this mode, warm-up included


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=2000, help="timed saves per round")
    p.add_argument("--rounds", type=int, default=6,
                   help="rounds in total, cycling plain/outbox/direct (a multiple of 3)")
    p.add_argument("--warmup", type=int, default=200, help="untimed saves per mode first")
    args = p.parse_args()
    if args.saves < 1 or args.rounds < 3 or args.rounds % 3 or args.warmup < 0:
        p.error("need --saves >= 1, --rounds a multiple of 3, --warmup >= 0")
    return args


def log(msg: str) -> None:
    """Progress goes to stderr, results to stdout."""
    print(msg, file=sys.stderr, flush=True)


def setup_django(db_path: Path, prefix: str) -> None:
    """Point the example project at ``db_path`` and ``prefix``, set it up and migrate."""
    sys.path.insert(0, str(REPO))
    from django.core.management import call_command

    from loadtest.example_project import use_example_project

    use_example_project(db_path, SCALEPUB_KEY_PREFIX=prefix)
    call_command("migrate", verbosity=0)


def redis_client() -> Any:
    """The producer's own Redis client; exits 1 if Redis does not answer."""
    import redis

    from scalepub.django.producer import get_producer, get_settings

    settings = get_settings()
    try:
        get_producer().client.ping()
    except redis.RedisError as exc:
        log(f"Redis at {settings.redis_url} does not answer ({exc}); "
            'run `eval "$(ops/stack env)"` with the stack up')
        sys.exit(1)
    return get_producer().client


def make_modes() -> list[Mode]:
    """Plain (unregistered), then registered with the model's node rule in each delivery."""
    from django.conf import settings
    from twitter.models import Tweet

    import scalepub
    from scalepub.django import producer
    from scalepub.django.registry import registry

    original = registry.get(Tweet)
    if original is None:
        log("twitter.Tweet is not registered by the example project; nothing to compare")
        sys.exit(1)
    base = dict(settings.SCALEPUB)

    def registered(delivery: str) -> Callable[[], None]:
        def activate() -> None:
            if settings.SCALEPUB.get("DELIVERY") != delivery:
                settings.SCALEPUB = {**base, "DELIVERY": delivery}
                producer.reset()  # stops (and drains) the relay thread of the other mode
            scalepub.register(Tweet, node=original.node)
        return activate

    return [
        Mode("plain", lambda: scalepub.unregister(Tweet)),
        Mode("outbox", registered("outbox")),
        Mode("direct", registered("direct")),
    ]


def run_saves(mode: Mode, count: int, timed: bool) -> None:
    """``count`` saves of new tweets in ``mode``, each timed alone when ``timed``."""
    from twitter.models import Tweet

    mode.activate()
    gc.collect()
    clock = time.perf_counter_ns
    for i in range(count):
        tweet = Tweet(author=AUTHORS[i % len(AUTHORS)], text=TEXT)
        start = clock()
        tweet.save()
        elapsed = clock() - start
        if timed:
            mode.times.append(elapsed)
    mode.saves += count


def run_rounds(modes: list[Mode], args: argparse.Namespace) -> None:
    """Warm up every mode, then cycle timed rounds A, B, C, A, B, C, ..."""
    for mode in modes:
        log(f"warm-up: {args.warmup} saves {mode.name}")
        run_saves(mode, args.warmup, timed=False)
    for r in range(args.rounds):
        mode = modes[r % len(modes)]
        before = len(mode.times)
        run_saves(mode, args.saves, timed=True)
        median = statistics.median(mode.times[before:])
        mode.round_medians.append(median)
        log(f"round {r + 1}/{args.rounds}: {mode.name:<10} {args.saves} saves, "
            f"median {median / 1000:.1f} us")


def stream_entries(client: Any, prefix: str) -> int:
    """Entries in every shard stream under ``prefix``."""
    from scalepub.sharding import Keys

    pattern = Keys(prefix).stream_pattern
    return sum(int(client.xlen(key)) for key in client.scan_iter(match=pattern, count=1000))


def delete_keys(client: Any, prefix: str) -> int:
    """Remove every key under ``prefix``; how many there were."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    return len(keys)


def p90(values: list[int]) -> float:
    """90th percentile (inclusive method)."""
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def report(modes: list[Mode], args: argparse.Namespace) -> None:
    """Print the Markdown table and one ratio line per registered mode."""
    plain, *registered = modes
    medians = {m.name: statistics.median(m.times) for m in modes}
    print(f"\n{args.rounds} rounds x {args.saves} saves, cycling the modes; "
          f"SQLite (WAL) autocommit file DB; times per save\n")
    print("| mode | saves | median (us) | p90 (us) | median / plain | p90 / plain |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in modes:
        print(f"| {m.name} | {len(m.times)} | {medians[m.name] / 1000:.1f} "
              f"| {p90(m.times) / 1000:.1f} | {medians[m.name] / medians['plain']:.2f} "
              f"| {p90(m.times) / p90(plain.times):.2f} |")
    print()
    for m in registered:
        ratio = medians[m.name] / medians["plain"]
        pairs = [b / a for a, b in zip(plain.round_medians, m.round_medians, strict=True)]
        verdict = "MET" if ratio <= TARGET else "NOT MET"
        print(f"{m.name}: ratio {ratio:.2f} (target <= {TARGET}: {verdict}), "
              f"+{(medians[m.name] - medians['plain']) / 1000:.1f} us; per-round ratios "
              f"{', '.join(f'{x:.2f}' for x in pairs)}")


def verify(client: Any, prefix: str, registered: list[Mode]) -> bool:
    """Print whether every registered save reached a Redis stream; True if so."""
    from scalepub.django import producer

    producer.reset()  # the relay thread drains the outbox before it stops
    expected = sum(m.saves for m in registered)
    found = stream_entries(client, prefix)
    ok = found == expected
    status = "OK" if ok else "FAILED"
    print(f"redis check {status}: {found} stream entries under {prefix!r}, "
          f"{expected} registered saves (warm-up included)")
    return ok


def main() -> int:
    """Set up, measure, report, verify, clean up."""
    args = parse_args()
    prefix = f"bench-ingest-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        setup_django(Path(tmp) / "bench.sqlite3", prefix)
        client = redis_client()
        try:
            modes = make_modes()
            run_rounds(modes, args)
            report(modes, args)
            ok = verify(client, prefix, modes[1:])
        finally:
            log(f"deleted {delete_keys(client, prefix)} Redis keys under {prefix!r}")
            from django.db import connection

            connection.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
