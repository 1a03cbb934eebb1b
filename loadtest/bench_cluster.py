"""Benchmark: one Redis against a Redis Cluster (3 masters + 3 replicas), in the same run.

    .venv/bin/python loadtest/bench_cluster.py [--entries 100000] [--rounds 2]

Starts its own stack (``ops/stack up --redis-cluster`` on free ports: ejabberd, the single
Redis and the cluster, AOF everysec on all, RDB saves off) and measures against each Redis,
alternating, ``--rounds`` times:

- append, batched: ``StreamProducer.append`` of 500 entries a call over 1,000 nodes and 8
  shards (one script per shard; on the cluster a pipeline split over the masters);
- append, one entry a call (one Django save in ``direct`` mode: one EVALSHA);
- relay append: 500 entries a call with an outbox source, as the relay does, with WAIT for
  REDIS_WAIT_REPLICAS (1 on the cluster, 0 on the single Redis: what each deletes rows after);
- publish: `scalepub run --shards 8` drains the pre-filled entries to ejabberd; entries/s
  between 10 % and 90 % acknowledged;
- memory per waiting entry: ``used_memory`` of the masters before and after the pre-fill of
  ~300-byte entries (replicas hold as much again), divided by the entries.

Prints a markdown table and the cluster/single ratios. Other work on the machine shows up in
the figures: compare ratios from the same run, not figures from different runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loadtest.bench_publish import CLK_TCK, cpu_ticks, payload  # noqa: E402
from loadtest.run import ejabberd_pids  # noqa: E402
from scalepub.backlog import stream_backlog  # noqa: E402
from scalepub.connections import cluster_of, sync_client  # noqa: E402
from scalepub.producer import PendingEntry, StreamProducer  # noqa: E402
from scalepub.settings import Settings, env_mapping  # noqa: E402
from scalepub.sharding import Keys  # noqa: E402
from tests.cluster import free_cluster_port  # noqa: E402
from tests.stack import Stack, new_stack  # noqa: E402

SHARDS = 8
NODES = 1000
BATCH = 500


@dataclass
class Figures:
    """One target's figures in one round."""

    target: str
    append_batched: float = 0.0  # entries/s
    append_single: float = 0.0  # entries/s, one call each
    relay_append: float = 0.0  # entries/s, with WAIT
    publish: float = 0.0  # entries/s
    bytes_per_entry: float = 0.0
    # CPU per published entry in the publish window, in us: shards, ejabberd, Redis (all
    # the target's redis-server processes: masters and replicas)
    cpu_us: tuple[float, float, float] = (0.0, 0.0, 0.0)


def entries(n: int, start: int = 0) -> list[PendingEntry]:
    out = []
    for i in range(start, start + n):
        author = f"bench{i % NODES}"
        out.append(PendingEntry(f"/bench/Tweet/{author}", time.time_ns(), "twitter.tweet",
                                str(i), "xml", payload(i, author)))
    return out


def fresh(base: Settings, maxlen: int) -> Settings:
    return base.replace(key_prefix=f"bc{uuid.uuid4().hex[:8]}", shards=SHARDS,
                        stream_maxlen=maxlen)


def cleanup(settings: Settings) -> None:
    client = sync_client(settings, timeout=10)
    for key in list(client.scan_iter(match=f"{settings.key_prefix}:*", count=1000)):
        client.delete(key)
    client.close()


def used_memory(settings: Settings) -> int:
    """used_memory of the single Redis, or summed over the cluster's masters."""
    client = sync_client(settings, timeout=10)
    try:
        cluster: Any = cluster_of(client)  # redis-py's cluster methods are untyped
        if cluster is None:
            return int(client.info("memory")["used_memory"])
        return sum(int(n.redis_connection.info("memory")["used_memory"])
                   for n in cluster.get_primaries())
    finally:
        client.close()


def timed(call: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    call()
    return count / (time.perf_counter() - started)


def append_rates(base: Settings, count: int) -> tuple[float, float, float]:
    """(batched, single, relay-with-WAIT) entries/s."""
    settings = fresh(base, count * 4)
    producer = StreamProducer(settings)
    try:
        batch = entries(count)
        chunks = [batch[i:i + BATCH] for i in range(0, count, BATCH)]
        batched = timed(lambda: [producer.append(c) for c in chunks], count)
        singles = entries(count // 10, count)
        single = timed(lambda: [producer.append([e]) for e in singles], len(singles))
        relayed = [e._replace(oid=i + 1) for i, e in enumerate(entries(count))]
        rchunks = [relayed[i:i + BATCH] for i in range(0, count, BATCH)]

        def relay() -> None:
            for c in rchunks:
                result = producer.append(c, source="bench")
                assert not result.failures, result.failures[0].message

        relay_rate = timed(relay, count)
    finally:
        producer.close()
        cleanup(settings)
    return batched, single, relay_rate


STACK: Stack | None = None  # the bench's own stack (for its process ids)


def redis_pids(settings: Settings) -> list[int]:
    """The target's redis-server processes: the single one, or all six cluster nodes."""
    assert STACK is not None
    files = (STACK.state_dir.glob("redis-cluster/*/redis.pid") if "+cluster" in settings.redis_url
             else [STACK.state_dir / "redis.pid"])
    return [int(f.read_text().strip()) for f in files]


def shard_pids(parent: int) -> list[int]:
    """Every process under the pool (shards, forkserver): psutil-free, from /proc."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True,
                         check=False).stdout
    kids = [int(p) for p in out.split()]
    return kids + [g for k in kids for g in shard_pids(k)]


def memory_and_publish(base: Settings, count: int
                       ) -> tuple[float, float, tuple[float, float, float]]:
    """(bytes per waiting entry, publish entries/s between 10 % and 90 %, CPU us/entry)."""
    settings = fresh(base, count + 100_000)
    before = used_memory(settings)
    producer = StreamProducer(settings)
    batch = entries(count)
    for i in range(0, count, BATCH):
        assert not producer.append(batch[i:i + BATCH]).failures
    producer.close()
    per_entry = (used_memory(settings) - before) / count
    try:
        return (per_entry, *publish(settings, count))
    finally:
        cleanup(settings)


def publish(settings: Settings, count: int) -> tuple[float, tuple[float, float, float]]:
    client = sync_client(settings, timeout=10)
    keys = Keys(settings.key_prefix)
    env = {**os.environ, **{f"SCALEPUB_{k.upper()}": str(v)
                            for k, v in dataclasses.asdict(settings).items()}}
    log = Path(f"/tmp/scalepub-bench-{settings.key_prefix}.log").open("w")  # noqa: SIM115
    pool = subprocess.Popen([str(Path(sys.executable).parent / "scalepub"), "run",
                             "--metrics-port", "0", "--shards", str(SHARDS)],
                            env=env, stderr=log)
    marks: list[tuple[float, int, list[int]]] = []
    assert STACK is not None
    servers = (ejabberd_pids(STACK), redis_pids(settings))
    try:
        while True:
            left = sum(sum(stream_backlog(client, keys.stream(s))) for s in range(SHARDS))
            done = count - left
            if len(marks) < 2 and done >= count * (0.1 if not marks else 0.9):
                groups = (shard_pids(pool.pid), *servers)
                marks.append((time.monotonic(), done, [cpu_ticks(g) for g in groups]))
            if len(marks) == 2 or pool.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        pool.terminate()
        pool.wait(30)
        log.close()
        client.close()
    if len(marks) < 2:
        raise RuntimeError(f"the pool exited early ({pool.returncode}): see {log.name}")
    (t0, d0, c0), (t1, d1, c1) = marks
    per_entry = tuple((b - a) / CLK_TCK / (d1 - d0) * 1e6 for a, b in zip(c0, c1, strict=True))
    return (d1 - d0) / (t1 - t0), (per_entry[0], per_entry[1], per_entry[2])


def measure(target: str, base: Settings, count: int) -> Figures:
    print(f"{target}: appends", file=sys.stderr)
    batched, single, relay = append_rates(base, count)
    print(f"{target}: memory and publish", file=sys.stderr)
    per_entry, rate, cpu = memory_and_publish(base, count)
    return Figures(target, batched, single, relay, rate, per_entry, cpu)


def table(rounds: list[list[Figures]]) -> str:
    lines = ["| target | append, 500/call | append, 1/call | relay append + WAIT "
             "| publish (8 shards) | CPU us/entry shards+ejabberd+Redis | bytes/waiting entry |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for figures in rounds:
        for f in figures:
            lines.append(f"| {f.target} | {f.append_batched:,.0f}/s | {f.append_single:,.0f}/s "
                         f"| {f.relay_append:,.0f}/s | {f.publish:,.0f}/s "
                         f"| {'+'.join(f'{c:.1f}' for c in f.cpu_us)} "
                         f"| {f.bytes_per_entry:,.0f} |")
    ratios = {name: statistics.median(
        getattr(r[1], name) / getattr(r[0], name) for r in rounds if getattr(r[0], name))
        for name in ("append_batched", "append_single", "relay_append", "publish",
                     "bytes_per_entry")}
    lines.append("")
    lines.append("cluster / single (median over rounds): " + ", ".join(
        f"{k} {v:.2f}" for k, v in ratios.items()))
    return "\n".join(lines)


def start() -> Stack:
    global STACK  # one stack per run, read by the process-id helpers
    stack = STACK = new_stack(SCALEPUB_REDIS_CLUSTER="on",
                      SCALEPUB_REDIS_CLUSTER_PORT=str(free_cluster_port()))
    stack.up()
    single = redis.Redis(port=int(stack.control["SCALEPUB_REDIS_PORT"]))
    single.config_set("save", "")  # no background save inside a measured window
    single.close()
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    stack = start()
    try:
        os.environ.update(stack.env)
        cluster = Settings.from_mapping(env_mapping(stack.env))
        single = cluster.replace(
            redis_url=f"redis://127.0.0.1:{stack.control['SCALEPUB_REDIS_PORT']}/0")
        rounds = []
        for _ in range(opts.rounds):
            rounds.append([measure("one Redis", single, opts.entries),
                           measure("cluster 3+3", cluster, opts.entries)])
        print(table(rounds))
    finally:
        stack.down()
        subprocess.run(["rm", "-rf", str(stack.state_dir)], check=False)


if __name__ == "__main__":
    main()
