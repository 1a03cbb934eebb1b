"""Measure what a Redis Cluster master's death loses, per delivery mode (docs/reliability.md).

    .venv/bin/python loadtest/failover_loss.py [--seconds 6] [--rounds 3]

Own stack (``ops/stack up --redis-cluster`` on free ports). Per round and mode, a producer
appends batches of 50 entries (100 nodes, 8 shards) as fast as it can; 2 s in, the master of
shard 0's slot gets SIGKILL; its replica takes over; the producer goes on until ``--seconds``.
Then every append Redis acknowledged is looked up on the new masters:

- ``direct``: ``append`` without an outbox source, as a ``DELIVERY = "direct"`` save does
  (entries Redis refuses go to the outbox: counted as spilled, not lost);
- ``outbox, WAIT 0``: the relay's append (outbox source) with REDIS_WAIT_REPLICAS=0: rows are
  deleted once the master answered;
- ``outbox, WAIT 1``: the default on a cluster: rows are deleted once a replica has them;
  unconfirmed ones are appended again (the relay's record answers those that landed).

An acknowledged append missing afterwards is lost (its outbox row, if any, deleted). The
killed node is restarted 2 s after the failover (it rejoins as the new master's replica).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scalepub.connections import sync_client  # noqa: E402
from scalepub.producer import Appended, PendingEntry, StreamProducer  # noqa: E402
from scalepub.settings import Settings, env_mapping  # noqa: E402
from scalepub.sharding import Keys  # noqa: E402
from tests import cluster  # noqa: E402
from tests.stack import Stack, new_stack  # noqa: E402

SHARDS = 8
BATCH = 50
MODES = ("direct", "outbox, WAIT 0", "outbox, WAIT 1")


@dataclasses.dataclass
class Outcome:
    mode: str
    acked: int = 0
    spilled: int = 0  # refused/unreachable without an outbox source: would go to the outbox
    unconfirmed: int = 0  # WAIT said not replicated: rows kept, appended again
    lost: int = 0
    failover_s: float = 0.0


def run_mode(stack: Stack, base: Settings, mode: str, seconds: float) -> Outcome:
    settings = base.replace(key_prefix=f"fl{uuid.uuid4().hex[:6]}", shards=SHARDS,
                            redis_wait_replicas=1 if mode.endswith("1") else 0)
    source = "" if mode == "direct" else "lossdb"
    producer = StreamProducer(settings)
    out = Outcome(mode)
    acked: list[Appended] = []
    stop = threading.Event()
    victim = cluster.master_of_slot(stack, key_slot(Keys(settings.key_prefix).stream(0).encode()))
    killer = threading.Thread(target=_kill, args=(stack, victim, stop, out), daemon=True)
    killer.start()
    started, oid = time.monotonic(), 0
    while time.monotonic() - started < seconds:
        batch = []
        for _ in range(BATCH):
            oid += 1
            batch.append(PendingEntry(f"/loss/n{oid % 100}", time.time_ns(), "t.row", str(oid),
                                      "xml", b"<row/>", oid=oid if source else None))
        _append_until_done(producer, batch, source, out, acked)
    stop.set()
    killer.join(120)
    producer.close()
    out.acked = len(acked)
    # Read only once the restarted node serves as a replica in sync: until it learns the new
    # epoch it may still answer for its old slots with its old data.
    _wait_ok(stack, victim.port)
    out.lost = _missing(settings, acked)
    return out


def _append_until_done(producer: StreamProducer, batch: list[PendingEntry], source: str,
                       out: Outcome, acked: list[Appended]) -> None:
    """The relay keeps rows until they are confirmed; direct mode hands them to the spill."""
    while batch:
        try:
            result = producer.append(batch, source=source)
        except redis.RedisError:
            if not source:
                out.spilled += len(batch)
                return
            time.sleep(0.05)
            continue
        acked.extend(result.appended)
        failed = {id(e) for f in result.failures for e in f.entries}
        if os.environ.get("LOSS_DEBUG") and result.failures:
            print(f"{time.monotonic():.2f} appended {len(result.appended)}, failures "
                  f"{[(f.shard, f.reason.value, len(f.entries)) for f in result.failures]}",
                  file=sys.stderr)
        out.unconfirmed += sum(len(f.entries) for f in result.failures
                               if f.reason.value == "replication")
        if not source:
            out.spilled += len(failed)
            return
        batch = [e for e in batch if id(e) in failed]
        if batch:
            time.sleep(0.05)


def _kill(stack: Stack, victim: cluster.Node, stop: threading.Event, out: Outcome) -> None:
    if stop.wait(2.0):
        return
    started = time.monotonic()
    cluster.kill_node(stack, victim.port)
    while not stop.is_set():
        try:
            live = [n for n in cluster.nodes(stack) if n.master and not n.failed
                    and n.port != victim.port]
        except RuntimeError:
            live = []
        if len(live) == 3:
            out.failover_s = time.monotonic() - started
            break
        time.sleep(0.05)
    # The promoted replica has none: WAIT 1 keeps rows until the old master is back as one.
    time.sleep(2.0)
    cluster.restart_node(stack, victim.port)


def _missing(settings: Settings, acked: list[Appended]) -> int:
    client: Any = sync_client(settings, timeout=10)
    keys = Keys(settings.key_prefix)
    missing = 0
    try:
        by_shard: dict[int, set[str]] = {}
        for a in acked:
            by_shard.setdefault(a.shard, set()).add(a.stream_id)
        for shard, ids in by_shard.items():
            kept = {sid.decode() for sid, _ in client.xrange(keys.stream(shard))}
            missing += len(ids - kept)
        for key in list(client.scan_iter(match=f"{settings.key_prefix}:*", count=1000)):
            client.delete(key)
    finally:
        client.close()
    return missing


def _wait_ok(stack: Stack, replica: int) -> None:
    deadline = time.monotonic() + 60
    while stack.run("status").returncode != 0 or not _synced_replica(replica):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not recover")
        time.sleep(0.5)


def _synced_replica(port: int) -> bool:
    role = cluster.cli(port, "role").split()
    return role[:1] == ["slave"] and "connected" in role


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=";".join(MODES), help="separated by ';'")
    opts = parser.parse_args()
    stack = new_stack(SCALEPUB_REDIS_CLUSTER="on",
                      SCALEPUB_REDIS_CLUSTER_PORT=str(cluster.free_cluster_port()))
    stack.up()
    try:
        base = Settings.from_mapping(env_mapping(stack.env))
        print("| round | mode | appends acknowledged | spilled to the outbox | WAIT unconfirmed "
              "(kept, re-appended) | lost | failover s |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for r in range(1, opts.rounds + 1):
            for mode in opts.modes.split(";"):
                o = run_mode(stack, base, mode, opts.seconds)
                print(f"| {r} | {o.mode} | {o.acked:,} | {o.spilled:,} | {o.unconfirmed:,} "
                      f"| {o.lost:,} | {o.failover_s:.2f} |", flush=True)
    finally:
        stack.down()


if __name__ == "__main__":
    main()
