"""Benchmark: the history endpoint for a quiet node behind a busy shard, old scan vs per-node.

    eval "$(ops/stack env)"; .venv/bin/python loadtest/bench_history.py [--busy N] [--storm N]

What, in one run against the same Redis and the same data:
1. The view's time (``GET /scalepub/history`` resolved to its view and called in-process with
   a ``RequestFactory`` request, so no HTTP server is measured) for a quiet node whose 2
   entries lie behind ``--busy`` (200,000) entries of other nodes of its shard: median and
   p90 over ``--requests`` calls, with today's per-node history and with the old backwards
   scan of the shard stream (the pre-issue-12 ``read_history``, kept below as the baseline),
   and their ratio. Target: a median <= 2 ms. Each answer is checked (entries and ``lost``).
2. A reconnect storm: ``--storm`` (500) quiet nodes of that shard, 5 entries each, all ask at
   once for what followed their seq 2 (``--threads`` (16) worker threads, as a threaded web
   process would): latency from the storm's start to each answer (p50, p99), the web
   process's CPU (``time.process_time``, all threads) and Redis's CPU (``INFO cpu`` delta).
   The old scan gets the same storm on ``--old-storm`` (20) nodes only (each request costs it
   about a second); figures per request are comparable.
3. Redis bytes per kept entry (``MEMORY USAGE ... SAMPLES 0``) in the per-node history (busy
   nodes at their ``HISTORY_MAXLEN`` cap) next to the shard stream's, same entries.

The example project's settings (``exampleproject.settings``, DEBUG off), a unique key prefix
whose keys are deleted at the end. Exits 1 if an answer is wrong; 0 otherwise, target met or
not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parents[1]
TARGET_MS = 2.0
SHARDS = 8
PAYLOAD = ('<?xml version="1.0" encoding="utf-8"?>\n<django-objects version="1.0"><object '
           'model="twitter.tweet" pk="{pk}"><field name="author" type="CharField">{author}'
           '</field><field name="text" type="TextField">a benchmark tweet of a realistic size, '
           'some words, a link https://example.com/x/y</field><field name="created_at" '
           'type="DateTimeField">2026-12-03T07:00:00.123456+00:00</field></object>'
           '</django-objects>')


def log(message: str) -> None:
    print(message, flush=True)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=200_000, help="entries of other nodes")
    p.add_argument("--requests", type=int, default=200, help="timed requests per side")
    p.add_argument("--storm", type=int, default=500, help="concurrent catch-up requests")
    p.add_argument("--old-storm", type=int, default=20, help="storm size for the old scan")
    p.add_argument("--threads", type=int, default=16, help="web threads serving the storm")
    return p.parse_args()


def setup_django(db_path: Path, prefix: str) -> None:
    """The example project on ``prefix``, DEBUG off (the view needs no database)."""
    sys.path.insert(0, str(REPO))
    from loadtest.example_project import use_example_project

    # No relay thread in this process. The view's Redis timeout is raised from its 1 s
    # default: on the shared box at load ~20 a reply (during the old scan's storm) came after
    # it, the view answered 503 and the run ended; the timeout bounds nothing measured here.
    use_example_project(db_path, SCALEPUB_KEY_PREFIX=prefix, SCALEPUB_SHARDS=str(SHARDS),
                        SCALEPUB_OUTBOX_RELAY="external", SCALEPUB_REDIS_TIMEOUT="30")


# -- the data --------------------------------------------------------------------------------


def nodes_of_shard(shard: int, count: int, stem: str) -> list[str]:
    """``count`` node names that hash to ``shard``."""
    from scalepub.sharding import shard_for

    out: list[str] = []
    i = 0
    while len(out) < count:
        node = f"/twitter/Tweet/{stem}{i}"
        if shard_for(node, SHARDS) == shard:
            out.append(node)
        i += 1
    return out


def append(settings: Any, nodes: list[str], per_node: int) -> None:
    """``per_node`` entries of each node, in bulk (5,000 a script call)."""
    from scalepub.producer import PendingEntry, StreamProducer

    producer = StreamProducer(settings)
    todo = [(node, i) for i in range(per_node) for node in nodes]
    try:
        for start in range(0, len(todo), 5000):
            batch = [PendingEntry(node, time.time_ns(), "twitter.tweet", str(i), "xml",
                                  PAYLOAD.format(pk=i, author=node.rsplit("/", 1)[1]).encode())
                     for node, i in todo[start:start + 5000]]
            result = producer.append(batch)
            if result.failures:
                raise SystemExit(f"append refused: {result.failures[0].message}")
    finally:
        producer.close()


# -- the baseline: read_history before issue 12 (a backwards scan of the shard stream) -------


def old_read_history(client: Any, keys: Any, shards: int, node: str, after: int,
                     limit: int) -> Any:
    """The pre-issue-12 ``read_history``, verbatim in behaviour."""
    from scalepub.history import History
    from scalepub.sharding import shard_for

    shard = shard_for(node, shards)
    last_seq = int(client.hget(keys.seqs(shard), node) or 0)
    found = History(node, last_seq=last_seq)
    if last_seq <= after:
        return found
    newest_first = _old_scan_back(client, keys.stream(shard), node, after)
    newest_first.reverse()
    seqs = [env.seq for env, _ in newest_first]
    found.lost = seqs != list(range(after + 1, after + 1 + len(seqs))) or not seqs
    for env, sid in newest_first[:limit]:
        found.entries.append(env)
        found.ids.append(sid)
    return found


def _old_scan_back(client: Any, key: str, node: str, after: int) -> list[Any]:
    from scalepub.envelope import EnvelopeError, decode
    from scalepub.sharding import ENTRY_FIELD

    out: list[Any] = []
    end, scanned = "+", 0
    while scanned < 200_000:
        chunk = client.xrevrange(key, max=end, min="-", count=2000)
        for sid, fields in chunk:
            try:
                env = decode(fields.get(ENTRY_FIELD, b""))
            except EnvelopeError:
                continue
            if env.node != node:
                continue
            if env.seq <= after:
                return out
            out.append((env, sid.decode()))
        if len(chunk) < 2000:
            return out
        scanned += len(chunk)
        end = "(" + chunk[-1][0].decode()
    return out


class View:
    """The history view, callable with today's ``read_history`` or the old one."""

    def __init__(self) -> None:
        from django.test import RequestFactory
        from django.urls import resolve

        match = resolve("/scalepub/history")
        self.view = match.func
        self.module = sys.modules[self.view.__module__]
        self.current = self.module.read_history
        self.factory = RequestFactory()
        self.side = "per-node history"

    def use(self, old: bool) -> None:
        self.module.read_history = old_read_history if old else self.current  # type: ignore
        self.side = "old scan" if old else "per-node history"

    def get(self, node: str, after: int) -> dict[str, Any]:
        import json

        request = self.factory.get("/scalepub/history", {"node": node, "after": after})
        response = self.view(request)
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code} ({self.side}): "
                             f"{response.content[:200]!r}")
        return cast(dict[str, Any], json.loads(response.content))


# -- the measurements ------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(view: View, node: str, count: int,
          check: Callable[[dict[str, Any]], bool]) -> list[float]:
    """``count`` requests of ``node`` after 0; each answer checked; ms each."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        body = view.get(node, 0)
        times.append((time.perf_counter() - started) * 1000)
        if not check(body):
            raise SystemExit(f"wrong answer: lost={body['lost']} "
                             f"seqs={[e['seq'] for e in body['entries']]}")
    return times


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def storm(view: View, client: Any, nodes: list[str], threads: int,
          check: Callable[[dict[str, Any]], bool]) -> dict[str, float]:
    """Every node asks at once for what followed seq 2; latency from the storm's start."""
    wrong: list[str] = []

    def one(node: str, start: float) -> float:
        body = view.get(node, 2)
        if not check(body):
            wrong.append(node)
        return (time.perf_counter() - start) * 1000

    cpu0, rcpu0 = time.process_time(), redis_cpu(client)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        latencies = list(pool.map(lambda n: one(n, started), nodes))
    wall = time.perf_counter() - started
    cpu, rcpu = time.process_time() - cpu0, redis_cpu(client) - rcpu0
    if wrong:
        raise SystemExit(f"{len(wrong)} wrong answers in the storm, e.g. {wrong[0]}")
    return {"n": len(nodes), "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99),
            "wall_s": wall, "web_cpu_ms": cpu * 1000 / len(nodes),
            "redis_cpu_ms": rcpu * 1000 / len(nodes)}


def bytes_per_entry(client: Any, keys: list[str]) -> float:
    total = sum(int(client.memory_usage(k, samples=0) or 0) for k in keys)
    return total / max(1, sum(int(client.xlen(k)) for k in keys))


def main() -> int:
    """Set up, measure, report, clean up."""
    args = parse_args()
    prefix = f"bench-history-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        setup_django(Path(tmp) / "unused.sqlite3", prefix)
        from scalepub.connections import sync_client
        from scalepub.settings import Settings
        from scalepub.sharding import Keys

        settings = Settings.from_env(key_prefix=prefix, shards=SHARDS, redis_timeout=30.0)
        client = sync_client(settings)
        try:
            return run(args, settings, client, Keys(prefix))
        finally:
            deleted = 0
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                deleted += int(client.unlink(key))
            log(f"deleted {deleted} Redis keys under {prefix!r}")


def run(args: argparse.Namespace, settings: Any, client: Any, keys: Any) -> int:
    shard = 0
    [quiet] = nodes_of_shard(shard, 1, "quiet")
    stormers = nodes_of_shard(shard, args.storm, "storm")
    busy = nodes_of_shard(shard, 50, "busy")
    started = time.monotonic()
    append(settings, [quiet], 2)
    append(settings, stormers, 5)
    append(settings, busy, args.busy // len(busy))
    log(f"data: quiet node {quiet} (2 entries), {len(stormers)} storm nodes (5 entries each), "
        f"then {args.busy // len(busy) * len(busy)} entries of {len(busy)} busy nodes, all on "
        f"shard {shard} of {SHARDS}; appended in {time.monotonic() - started:.1f} s; "
        f"HISTORY_MAXLEN {settings.history_maxlen}")
    view = View()
    quiet_ok = lambda b: [e["seq"] for e in b["entries"]] == [1, 2] and not b["lost"]  # noqa: E731
    old_quiet = lambda b: True  # noqa: E731  (it answers lost: true with no entries: the bug)
    storm_ok = lambda b: [e["seq"] for e in b["entries"]] == [3, 4, 5] and not b["lost"]  # noqa: E731
    for _ in range(20):  # warm-up: connections, script cache, imports
        view.get(quiet, 0)
    new = timed(view, quiet, args.requests, quiet_ok)
    view.use(old=True)
    old_count = max(3, args.requests // 40)
    old = timed(view, quiet, old_count, old_quiet)
    old_answer = view.get(quiet, 0)
    old_storm = storm(view, client, stormers[:args.old_storm], args.threads, lambda b: True)
    view.use(old=False)
    new_storm = storm(view, client, stormers, args.threads, storm_ok)
    report(args, new, old, old_answer, new_storm, old_storm)
    hist = [keys.history(shard, n) for n in busy]
    log(f"Redis bytes per kept entry: per-node history {bytes_per_entry(client, hist):.0f} B "
        f"({len(hist)} nodes at their cap of {settings.history_maxlen}), shard stream "
        f"{bytes_per_entry(client, [keys.stream(shard)]):.0f} B (same entries, payload "
        f"{len(PAYLOAD.format(pk=1, author='busy1'))} B)")
    return 0


def report(args: argparse.Namespace, new: list[float], old: list[float], old_answer: Any,
           new_storm: dict[str, float], old_storm: dict[str, float]) -> None:
    new_med, old_med = statistics.median(new), statistics.median(old)
    log(f"quiet node behind {args.busy} entries, view time: per-node history median "
        f"{new_med:.2f} ms (p90 {pct(new, 0.9):.2f}, {len(new)} requests), old scan median "
        f"{old_med:.1f} ms ({len(old)} requests); old/new {old_med / new_med:.0f}x; target "
        f"<= {TARGET_MS} ms: {'met' if new_med <= TARGET_MS else 'NOT met'}")
    log(f"  answers: per-node history entries [1, 2], lost false; old scan entries "
        f"{[e['seq'] for e in old_answer['entries']]}, lost {str(old_answer['lost']).lower()}")
    for name, s in (("per-node history", new_storm), ("old scan", old_storm)):
        log(f"storm, {name}: {s['n']:.0f} concurrent catch-ups on {args.threads} threads: "
            f"p50 {s['p50']:.1f} ms, p99 {s['p99']:.1f} ms, all done in {s['wall_s']:.2f} s; "
            f"web CPU {s['web_cpu_ms']:.2f} ms/request, Redis CPU {s['redis_cpu_ms']:.3f} "
            f"ms/request")
    log(f"  old/new per request: web CPU {old_storm['web_cpu_ms'] / new_storm['web_cpu_ms']:.0f}x,"
        f" Redis CPU {old_storm['redis_cpu_ms'] / max(new_storm['redis_cpu_ms'], 1e-6):.0f}x")


if __name__ == "__main__":
    sys.exit(main())
