"""Benchmark: what ``scalepub.register`` adds to a Django save, plain vs registered, one run.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_ingest.py [--saves N] [--rounds R]

What: the median wall time of one ``Tweet(...).save()`` of the example project (a created row,
SQLite in Django's default autocommit mode, so every save is its own committed INSERT) with
the model unregistered ("plain") and registered with its original per-author node
("registered": post_save -> on_commit, which runs at once outside ``atomic`` -> Django XML
serializer -> one EVALSHA to Redis). The ratio of the two medians is the number to watch;
the target is <= 1.3.

How: Django is configured here (``exampleproject.settings``, DEBUG off so query logging does
not pad both sides) with a fresh temporary SQLite file and a unique ``SCALEPUB_KEY_PREFIX``.
After a warm-up in both modes (connections, Lua script load, imports), R rounds of N saves
alternate plain, registered, plain, ... so drift on a noisy machine hits both modes alike;
each save is timed alone with ``time.perf_counter_ns`` (the instance is built outside the
timer). Median and p90 are over all saves of a mode. Afterwards the stream entries under the
prefix are counted: they must equal the registered saves, else the registered path is broken
and the script exits 1. Otherwise it exits 0 whether the target was met or not. The Redis
keys under the prefix and the database file are removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
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
                   help="rounds in total, alternating plain/registered (even)")
    p.add_argument("--warmup", type=int, default=200, help="untimed saves per mode first")
    args = p.parse_args()
    if args.saves < 1 or args.rounds < 2 or args.rounds % 2 or args.warmup < 0:
        p.error("need --saves >= 1, an even --rounds >= 2, --warmup >= 0")
    return args


def log(msg: str) -> None:
    """Progress goes to stderr, results to stdout."""
    print(msg, file=sys.stderr, flush=True)


def setup_django(db_path: Path, prefix: str) -> None:
    """Point the example project at ``db_path`` and ``prefix``, set it up and migrate."""
    for path in (REPO / "example", REPO):
        sys.path.insert(0, str(path))
    os.environ["DJANGO_SETTINGS_MODULE"] = "exampleproject.settings"
    os.environ["EXAMPLE_DB"] = str(db_path)
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ["SCALEPUB_KEY_PREFIX"] = prefix
    import django
    from django.core.management import call_command

    django.setup()
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
    """Plain (unregistered) and registered with the model's original node rule."""
    from twitter.models import Tweet

    import scalepub
    from scalepub.django.registry import registry

    original = registry.get(Tweet)
    if original is None:
        log("twitter.Tweet is not registered by the example project; nothing to compare")
        sys.exit(1)
    return [
        Mode("plain", lambda: scalepub.unregister(Tweet)),
        Mode("registered", lambda: scalepub.register(Tweet, node=original.node)),
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
    """Warm up both modes, then alternate timed rounds A, B, A, B, ..."""
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


def report(modes: list[Mode], args: argparse.Namespace) -> float:
    """Print the Markdown table and the ratio line; return the ratio of medians."""
    plain, registered = modes
    medians = {m.name: statistics.median(m.times) for m in modes}
    ratio = medians["registered"] / medians["plain"]
    print(f"\n{args.rounds} rounds x {args.saves} saves, alternating; "
          f"SQLite autocommit file DB; times per save\n")
    print("| mode | saves | median (us) | p90 (us) |")
    print("|---|---:|---:|---:|")
    for m in modes:
        print(f"| {m.name} | {len(m.times)} | {medians[m.name] / 1000:.1f} "
              f"| {p90(m.times) / 1000:.1f} |")
    print(f"| ratio | | {ratio:.2f} | {p90(registered.times) / p90(plain.times):.2f} |\n")
    pairs = [b / a for a, b in zip(plain.round_medians, registered.round_medians, strict=True)]
    print(f"per-pair ratios of round medians: {', '.join(f'{x:.2f}' for x in pairs)}")
    print(f"ratio registered/plain (median): {ratio:.2f} (target <= {TARGET})")
    verdict = "MET" if ratio <= TARGET else "NOT MET"
    print(f"target {verdict}: registered save costs {ratio:.2f}x a plain save "
          f"(+{(medians['registered'] - medians['plain']) / 1000:.1f} us)")
    return ratio


def verify(client: Any, prefix: str, registered: Mode) -> bool:
    """Print whether every registered save reached a Redis stream; True if so."""
    found = stream_entries(client, prefix)
    ok = found == registered.saves
    status = "OK" if ok else "FAILED"
    print(f"redis check {status}: {found} stream entries under {prefix!r}, "
          f"{registered.saves} registered saves (warm-up included)")
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
            ok = verify(client, prefix, modes[1])
        finally:
            log(f"deleted {delete_keys(client, prefix)} Redis keys under {prefix!r}")
            from django.db import connection

            connection.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
