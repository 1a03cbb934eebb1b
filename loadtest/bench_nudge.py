"""Benchmark: commit -> append latency of saves made where the relay lease is not held (SQLite).

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_nudge.py [--saves N] [--poll-ms MS]

A web process of the example project (``runserver``, no requests) takes the relay lease of a
scratch SQLite file; this process saves Tweets one at a time, so its own relay thread does
not lead, and clocks each save from its commit to its entry in Redis. Rounds alternate
between the nudge (this process's relay publishes on the database's nudge channel after its
commits; scalepub/django/nudge.py) and no nudge (``nudge.send`` stubbed out in this process:
the leader finds the row at its next poll, OUTBOX_POLL_MS, as before the nudge existed), so
load drift on a busy machine hits both alike. Prints p50/p90/max of each and the ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MANAGE = REPO / "example" / "manage.py"


def commit_to_append(count: int, pause_s: float = 0.03) -> list[float]:
    """In a Django process of the example project: ``count`` Tweet saves, one at a time;
    each one's seconds from its commit to its entry being in a shard stream."""
    import redis
    from twitter.models import Tweet

    from scalepub.django.runtime import runtime
    from scalepub.sharding import Keys

    settings = runtime.settings()
    client = redis.Redis.from_url(settings.redis_url)
    streams = [Keys(settings.key_prefix).stream(i) for i in range(settings.shards)]

    def entries() -> int:
        pipe = client.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
        return sum(pipe.execute())

    took: list[float] = []
    for i in range(count):
        before = entries()
        Tweet.objects.create(author=f"nudge{i % 5}", text=str(i))
        committed = time.perf_counter()
        deadline = committed + 30
        while entries() <= before and time.perf_counter() < deadline:
            time.sleep(0.0005)
        took.append(time.perf_counter() - committed)
        time.sleep(random.uniform(pause_s, 2 * pause_s))  # a random phase of the poll
    client.close()
    return took


def without_nudge() -> None:
    """Stub out this process's nudges: the leader finds its rows by polling."""
    from scalepub.django import nudge

    nudge.send = lambda client, channel: False


def example_env(db: Path, poll_ms: float) -> dict[str, str]:
    """The example project on ``db`` (SQLite: DATABASE_URL dropped) with a fresh prefix."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({"EXAMPLE_DB": str(db), "DJANGO_DEBUG": "0", "PYTHONUNBUFFERED": "1",
                "DJANGO_SETTINGS_MODULE": "exampleproject.settings",
                "PYTHONPATH": f"{REPO}:{env.get('PYTHONPATH', '')}",
                "SCALEPUB_KEY_PREFIX": f"bench-nudge-{uuid.uuid4().hex[:8]}",
                "SCALEPUB_OUTBOX_POLL_MS": str(poll_ms)})
    return env


def start_leader(env: dict[str, str], log: Any) -> subprocess.Popen[bytes]:
    """``runserver`` of the example project: its relay takes the lease (no request sent)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return subprocess.Popen(
        [sys.executable, str(MANAGE), "runserver", "--noreload", f"127.0.0.1:{port}"],
        env=env, cwd=MANAGE.parent, stdout=log, stderr=subprocess.STDOUT)


def wait_for_leader(env: dict[str, str], timeout: float = 60) -> None:
    """Until someone holds the relay lease and subscribed to the nudge channel."""
    import redis

    client = redis.Redis.from_url(env["SCALEPUB_REDIS_URL"])
    prefix = env["SCALEPUB_KEY_PREFIX"]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            leases = list(client.scan_iter(match=f"{prefix}:relay:*", count=1000))
            channels = client.pubsub_channels(f"{prefix}:relay:*:nudge")
            if any(not k.endswith(b":state") for k in leases) and channels:
                return
            time.sleep(0.1)
    finally:
        client.close()
    raise SystemExit("bench_nudge: the web process never took the relay lease")


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=200, help="saves per variant (200)")
    parser.add_argument("--rounds", type=int, default=4, help="alternations (4)")
    parser.add_argument("--poll-ms", type=float, default=10.0,
                        help="the leader's OUTBOX_POLL_MS (10, the default)")
    args = parser.parse_args()
    if "SCALEPUB_REDIS_URL" not in os.environ:
        print('bench_nudge: run `eval "$(ops/stack env)"` first', file=sys.stderr)
        return 2
    if "+cluster" in os.environ["SCALEPUB_REDIS_URL"].split("://")[0]:
        print("bench_nudge: SCALEPUB_REDIS_URL must name a single Redis, not a cluster",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "nudge.sqlite3"
        env = example_env(db, args.poll_ms)
        subprocess.run([sys.executable, str(MANAGE), "migrate", "-v0"], env=env,
                       cwd=MANAGE.parent, check=True)
        with (Path(tmp) / "web.log").open("wb") as log:
            leader = start_leader(env, log)
            try:
                wait_for_leader(env)
                on, off = measure(env, db, args)
            finally:
                leader.terminate()
                leader.wait(20)
    report(on, off, args)
    return 0


def measure(env: dict[str, str], db: Path, args: argparse.Namespace
            ) -> tuple[list[float], list[float]]:
    """Alternating rounds in this process: with the nudge, then without (order swapped each
    round). This process is the example project too, on the same SQLite file."""
    os.environ.update(env)
    sys.path[:0] = [str(REPO / "example"), str(REPO)]
    import django

    django.setup()
    from scalepub.django import nudge

    real = nudge.send
    per_round = max(1, args.saves // args.rounds)
    commit_to_append(5)  # warm-up: this process's relay thread starts, finds the lease held
    on: list[float] = []
    off: list[float] = []
    for r in range(args.rounds):
        for nudged in ((True, False) if r % 2 == 0 else (False, True)):
            if nudged:
                nudge.send = real
            else:
                without_nudge()
            (on if nudged else off).extend(commit_to_append(per_round))
    nudge.send = real
    return on, off


def report(on: list[float], off: list[float], args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    print(f"commit -> append, saves where the relay lease is NOT held (SQLite, leader's "
          f"OUTBOX_POLL_MS {args.poll_ms:g}), {len(on)} saves each, alternating; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    for name, values in (("poll only", off), ("nudge", on)):
        print(f"  {name:10s} p50 {pct(values, 0.5):7.2f} ms  p90 {pct(values, 0.9):7.2f} ms  "
              f"max {max(values) * 1000:7.2f} ms  mean {statistics.mean(values) * 1000:7.2f} ms")
    print(f"  ratio poll/nudge: p50 {pct(off, 0.5) / pct(on, 0.5):.1f}x, "
          f"p90 {pct(off, 0.9) / pct(on, 0.9):.1f}x")


if __name__ == "__main__":
    sys.exit(main())
