"""Faults during load (docs/reliability.md §3).

Each test appends 21,000 entries to 100 nodes over 4 shards at a steady rate from a producer
thread while `scalepub run --shards 4` publishes them, and injects one fault a few seconds
into the load: kill -9 of a shard process, kill -9 of the supervisor, an ejabberd restart, a
Redis restart (AOF on) and a 10 s SIGSTOP of ejabberd.

The verdict comes from outside the pool: the truth is what Redis holds (the per-node seq
counters and the stream entries, each (node, seq) → its stream id), and the judge is an
independent slixmpp subscriber (tests.e2e.Collector, reconnecting here). Every (node, seq)
must arrive, first arrivals in seq order, each with the stream id it was appended with, so a
duplicate can only be a re-delivery of the same entry. Only while the subscriber itself is
cut off (the ejabberd restart) does it miss live events; for that test the server's stored
items (a stack with SCALEPUB_PUBSUB_MAX_ITEMS) are the witness of completeness.

The recovery time of each fault is printed (also without -s) and, if SCALEPUB_FAULT_RESULTS
names a file, appended to it as a JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scalepub.envelope import decode
from scalepub.producer import PendingEntry, Refusal, StreamProducer
from scalepub.settings import Settings, env_mapping
from scalepub.sharding import CONSUMER_GROUP, ENTRY_FIELD, Keys, shard_for
from tests.e2e import Collector, Got, PoolProcess, create_nodes, stored_entries, wait_until
from tests.stack import Stack, running
from tests.streams import RawEntries, drained

pytestmark = [pytest.mark.stack, pytest.mark.timeout(150)]

SHARDS = 4
NODES = 100
PER_ROUND = 2  # entries per node and round, committed together (as a save of two rows)
ROUNDS = 105  # 21,000 entries
ROUND_INTERVAL_S = 0.1  # 2,000 entries/s, ~10.5 s of load
PER_NODE = PER_ROUND * ROUNDS
FAULT_AFTER_S = 3.0  # into the load: the load goes on during and after the fault
STALL_S = 10.0
DRAIN_TIMEOUT_S = 90.0


# -- the stack ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_stack() -> Iterator[Stack]:
    """A private stack, configured as shipped (ejabberd keeps no items): its servers get
    restarted and stopped, which the session's stack must not see."""
    yield from running(SCALEPUB_PUBSUB_MAX_ITEMS="0")


@pytest.fixture(scope="module")
def storing_stack() -> Iterator[Stack]:
    """A private stack whose ejabberd stores up to 1000 items per node, so the server can
    tell after its restart what it had confirmed. (Storing slows ejabberd down.)"""
    yield from running(SCALEPUB_PUBSUB_MAX_ITEMS="1000")


def ejabberd_pid(stack: Stack) -> int:
    """The beam.smp of the stack's node, from `ops/stack status`."""
    out = stack.run("status").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("ejabberd: running"))
    return int(line.split("pid ", 1)[1].split(",", 1)[0])


def redis_down(stack: Stack) -> None:
    """SIGTERM = SHUTDOWN: Redis fsyncs its AOF, then exits (as `ops/stack` stops it)."""
    pid = int((stack.state_dir / "redis.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: not alive(pid), 30), "Redis did not stop"


def redis_up(stack: Stack, settings: Settings) -> None:
    """Start Redis again from the config `ops/stack up` rendered (AOF on, everysec)."""
    conf = stack.state_dir / "redis.conf"
    assert "appendonly yes" in conf.read_text()
    subprocess.run(["redis-server", str(conf)], check=True, capture_output=True, timeout=30)
    client = redis.Redis.from_url(settings.redis_url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
    try:
        assert wait_until(answers, 30), "Redis did not come back"
    finally:
        client.close()


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or before the read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"



# -- the load ----------------------------------------------------------------------------


class _QuietSpill:
    """Appends that failed (Redis down) are the producer thread's to retry: no log per entry."""

    def spill(self, entries: Sequence[PendingEntry], reason: Refusal, message: str) -> None:
        pass


class SteadyProducer(threading.Thread):
    """Appends PER_ROUND entries per node every ROUND_INTERVAL_S, one Lua call per shard.

    A failed append is retried until it lands. Its outcome is unknown (the script may have
    run and only the reply been lost), so before each retry the node's seq counter must
    answer whether it was applied, and the client itself never re-sends (redis-py's default
    retry would append twice). In the Django app this job is the outbox's (§1).
    """

    def __init__(self, settings: Settings, nodes: list[str]) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.by_shard: dict[int, list[str]] = defaultdict(list)
        for node in nodes:
            self.by_shard[shard_for(node, settings.shards)].append(node)
        self.rounds = 0
        self.retried_rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=10,
                                      socket_connect_timeout=2, retry=Retry(NoBackoff(), 0))
        producer = StreamProducer(self.settings, client=client, spill=_QuietSpill())
        started = time.monotonic()
        try:
            for i in range(ROUNDS):
                for shard, nodes in self.by_shard.items():
                    self._append(producer, shard, nodes, i)
                self.rounds = i + 1
                time.sleep(max(0.0, started + (i + 1) * ROUND_INTERVAL_S - time.monotonic()))
        except BaseException as exc:
            self.error = exc
        finally:
            producer.close()

    def _append(self, producer: StreamProducer, shard: int, nodes: list[str], i: int) -> None:
        entries = [PendingEntry(n, time.time_ns(), "t.row", str(k), "xml", row(n, k))
                   for n in nodes for k in range(i * PER_ROUND, (i + 1) * PER_ROUND)]
        if producer.enqueue(entries) is not None:
            return
        self.retried_rounds += 1
        while not self._landed(producer.client, shard, nodes[0], (i + 1) * PER_ROUND):
            if producer.enqueue(entries) is not None:
                return

    def _landed(self, client: redis.Redis, shard: int, node: str, seq: int) -> bool:
        """Whether the append that gives ``node`` its ``seq`` was applied (waits for Redis)."""
        while True:
            time.sleep(0.1)
            try:
                return int(client.hget(self.keys.seqs(shard), node) or 0) >= seq
            except redis.RedisError:
                continue


def row(node: str, i: int) -> bytes:
    return f"<row><n>{i}</n><text>{node} entry {i} {'x' * 120}</text></row>".encode()


# -- the truth: what Redis holds ---------------------------------------------------------


def appended_ids(client: redis.Redis, keys: Keys) -> dict[tuple[str, int], str]:
    """(node, seq) → stream id of every entry in the shard streams."""
    out: dict[tuple[str, int], str] = {}
    for shard in range(SHARDS):
        for sid, fields in cast(RawEntries, client.xrange(keys.stream(shard))):
            env = decode(fields[ENTRY_FIELD])
            assert (env.node, env.seq) not in out, f"{env.node} seq {env.seq} appended twice"
            out[(env.node, env.seq)] = sid.decode()
    return out


def seq_counters(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """The per-node seq counters: the last seq each node was given."""
    out: dict[str, int] = {}
    for shard in range(SHARDS):
        seqs = cast(dict[bytes, bytes], client.hgetall(keys.seqs(shard)))
        out.update({k.decode(): int(v) for k, v in seqs.items()})
    return out


# -- the figures: delivery delays seen by the subscriber --------------------------------

SLOW_S = 1.0  # an entry first delivered later than this after its append counts as delayed


@dataclass
class Recovery:
    """One fault's timing (wall clock, ``time.time()``) and what the subscriber saw."""

    fault: str
    started: float = 0.0
    ended: float = 0.0
    affected: set[str] | None = None  # the nodes the fault hits (None: all)
    extra: dict[str, object] = field(default_factory=dict)

    def begin(self) -> None:
        """The fault starts now."""
        self.started = time.time()

    def end(self) -> None:
        """The fault is over now (server back, process signalled or restarted)."""
        self.ended = time.time()

    def figures(self, by_node: dict[str, list[Got]]) -> dict[str, object]:
        """Delays (append → first arrival) before the fault, and the recovery after it."""
        arrivals = _first_arrivals(by_node)
        first = [got[0] for (node, _), got in arrivals.items()
                 if self.affected is None or node in self.affected]
        # Nodes the fault does not touch, same time span: the machine's own noise.
        others = [(got[0].at - got[0].ts) / 1e9 for (node, _), got in arrivals.items()
                  if self.affected is not None and node not in self.affected
                  and got[0].at / 1e9 > self.started]
        # The baseline: entries delivered before the fault began, under the same load.
        before = sorted((g.at - g.ts) / 1e9 for g in first if g.at / 1e9 < self.started)
        slow = [g for g in first if (g.at - g.ts) / 1e9 > SLOW_S and g.at / 1e9 > self.started]
        last_slow = max((g.at / 1e9 for g in slow), default=self.ended)
        after = [g.at / 1e9 for g in first if g.at / 1e9 > self.ended]
        return {
            "fault_s": round(self.ended - self.started, 2),
            "baseline_delay_p50_s": round(before[len(before) // 2], 3) if before else None,
            "baseline_delay_max_s": round(before[-1], 3) if before else None,
            "max_delay_s": round(max((g.at - g.ts) / 1e9 for g in first), 2),
            "first_delivery_s": round(min(after) - self.ended, 2) if after else None,
            # From the fault's end until delivery delays are back under SLOW_S.
            "recovered_s": round(max(last_slow - self.ended, 0.0), 2),
            "delayed_entries": len(slow),
            **({"unaffected_max_delay_s": round(max(others), 2)} if others else {}),
        }


def _first_arrivals(by_node: dict[str, list[Got]]) -> dict[tuple[str, int], list[Got]]:
    out: dict[tuple[str, int], list[Got]] = {}
    for node, got in by_node.items():
        for g in got:
            out.setdefault((node, g.seq), []).append(g)
    return out


def report(recovery: Recovery, by_node: dict[str, list[Got]],
           capsys: pytest.CaptureFixture[str]) -> None:
    """Print the figures (visible without -s) and append them to $SCALEPUB_FAULT_RESULTS."""
    figures = {**recovery.figures(by_node), **recovery.extra}
    line = f"FAULT {recovery.fault}: " + ", ".join(f"{k}={v}" for k, v in figures.items())
    with capsys.disabled():
        print("\n" + line)
    results = os.environ.get("SCALEPUB_FAULT_RESULTS")
    if results:
        with open(results, "a") as f:
            f.write(json.dumps({"fault": recovery.fault, **figures}) + "\n")


# -- verdicts ----------------------------------------------------------------------------


def check_ids_and_order(by_node: dict[str, list[Got]], truth: dict[tuple[str, int], str]) -> int:
    """Every entry received carries its appended id; first arrivals in seq order.

    Returns the number of duplicates (re-deliveries of the same id).
    """
    duplicates = 0
    for node, got in by_node.items():
        seen: set[int] = set()
        last = 0
        for g in got:
            assert truth.get((node, g.seq)) == g.id, (
                f"{node} seq {g.seq} arrived with id {g.id}, appended as "
                f"{truth.get((node, g.seq))}")
            if g.seq in seen:
                duplicates += 1
                continue
            assert g.seq > last, f"{node}: seq {g.seq} first arrived after seq {last}"
            seen.add(g.seq)
            last = g.seq
    return duplicates


def missing(by_node: dict[str, list[Got]], truth: dict[tuple[str, int], str]) -> set[tuple[str, int]]:
    have = {(node, g.seq) for node, got in by_node.items() for g in got}
    return set(truth) - have


@dataclass
class Run:
    """One scenario: settings, nodes, subscriber, producer, pool."""

    stack: Stack
    settings: Settings
    nodes: list[str]
    client: redis.Redis
    collector: Collector
    producer: SteadyProducer
    pools: list[PoolProcess]
    log_dir: Path

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)

    def start_pool(self) -> PoolProcess:
        pool = PoolProcess(self.settings, self.log_dir / f"pool{len(self.pools)}.log",
                           "--shards", str(SHARDS))
        self.pools.append(pool)
        return pool

    def finish(self) -> dict[tuple[str, int], str]:
        """Wait for the load and the pool; return the truth; check the pool's own end state."""
        self.producer.join(60)
        assert not self.producer.is_alive() and self.producer.error is None, self.producer.error
        counters = seq_counters(self.client, self.keys)
        assert counters == dict.fromkeys(self.nodes, PER_NODE), "the producer's appends"
        truth = appended_ids(self.client, self.keys)
        assert len(truth) == NODES * PER_NODE
        logs = "\n".join(p.output()[-3000:] for p in self.pools)
        assert wait_until(lambda: drained(self.settings, self.client), DRAIN_TIMEOUT_S, 0.5), logs
        assert sum(self.client.xlen(self.keys.dead(s)) for s in range(SHARDS)) == 0, logs
        return truth


@pytest.fixture
def run(fault_stack: Stack, tmp_path: Path) -> Iterator[Run]:
    """A scenario on the stack as shipped."""
    yield from _run(fault_stack, tmp_path)


@pytest.fixture
def storing_run(storing_stack: Stack, tmp_path: Path) -> Iterator[Run]:
    """A scenario on the storing stack."""
    yield from _run(storing_stack, tmp_path)


def _run(fault_stack: Stack, tmp_path: Path) -> Iterator[Run]:
    settings = Settings.from_mapping(env_mapping(fault_stack.env),
                                     key_prefix=f"f{uuid.uuid4().hex[:8]}", shards=SHARDS)
    nodes = [f"/faults/load/{settings.key_prefix}/n{i}" for i in range(NODES)]
    create_nodes(fault_stack.env, nodes)
    client = redis.Redis.from_url(settings.redis_url)
    collector = Collector(fault_stack.env, nodes, reconnect=True).start()
    r = Run(fault_stack, settings, nodes, client, collector, SteadyProducer(settings, nodes),
            [], tmp_path)
    try:
        yield r
    finally:
        for pool in r.pools:
            pool.kill()
        collector.stop()
        for key in client.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
            client.delete(key)
        client.close()


def start_load(run: Run) -> PoolProcess:
    """The pool running (every shard's heartbeat seen), then the load for FAULT_AFTER_S."""
    pool = run.start_pool()
    pool.wait_serving(run.client)
    run.producer.start()
    time.sleep(FAULT_AFTER_S)
    assert run.producer.is_alive(), "the load ended before the fault"
    return pool


def busy_shard(run: Run, timeout: float = 10.0) -> tuple[int, int, int]:
    """(shard, pid, pending entries) of a shard process with unconfirmed entries right now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for shard in range(SHARDS):
            pending = run.client.xpending(run.keys.stream(shard), CONSUMER_GROUP)["pending"]
            if pending:
                pid = run.client.hget(run.keys.heartbeat(shard), "pid")
                return shard, int(pid or 0), int(pending)
        time.sleep(0.005)
    raise AssertionError("no shard had pending entries")


def verdict(run: Run, truth: dict[tuple[str, int], str], recovery: Recovery,
            capsys: pytest.CaptureFixture[str]) -> None:
    """The subscriber holds every entry, in order, duplicates only of the same id."""
    run.collector.wait_for(lambda got: len({(g.node, g.seq) for g in got}) >= len(truth), 30)
    by_node = run.collector.by_node()
    lost = missing(by_node, truth)
    assert not lost, f"{len(lost)} entries never reached the subscriber, e.g. {sorted(lost)[:5]}"
    recovery.extra["entries"] = len(truth)
    recovery.extra["duplicates"] = check_ids_and_order(by_node, truth)
    report(recovery, by_node, capsys)


def test_kill_9_of_a_shard_process(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    recovery = Recovery("kill -9 of a shard process")
    pool = start_load(run)
    # A shard with entries read but unconfirmed, so the kill leaves some for XAUTOCLAIM.
    shard, victim, pending = busy_shard(run)
    recovery.affected = set(run.producer.by_shard[shard])
    recovery.begin()
    os.kill(victim, signal.SIGKILL)
    recovery.end()
    recovery.extra["pending_at_kill"] = pending
    truth = run.finish()
    pids = pool.shard_pids()  # the killed one restarted by the supervisor
    assert len(pids) == SHARDS and victim not in pids
    verdict(run, truth, recovery, capsys)
    assert pool.stop() == 0, pool.output()[-3000:]


def test_kill_9_of_the_supervisor(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    recovery = Recovery("kill -9 of the supervisor")
    old = start_load(run)
    orphans = old.shard_pids()
    assert len(orphans) == SHARDS
    recovery.begin()
    old.proc.kill()
    old.proc.wait(10)
    new = run.start_pool()  # what a process manager does: start it again at once
    recovery.end()
    assert wait_until(lambda: not any(map(alive, orphans)), 40), "orphaned shards still run"
    recovery.extra["orphans_exited_s"] = round(time.time() - recovery.started, 1)
    truth = run.finish()
    verdict(run, truth, recovery, capsys)
    assert new.stop() == 0, new.output()[-3000:]


def test_ejabberd_restart(storing_run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    run = storing_run
    recovery = Recovery("ejabberd restart")
    pool = start_load(run)
    shards = sorted(pool.shard_pids())
    recovery.begin()
    done = run.stack.run("restart", "ejabberd")
    recovery.end()
    assert done.returncode == 0, done.stderr
    truth = run.finish()
    assert sorted(pool.shard_pids()) == shards, "a shard died instead of reconnecting"
    assert run.collector.wait_for(lambda _got: run.collector.sessions >= 2, 30)
    # The subscriber was cut off during the restart and misses what was published then: the
    # server's stored items witness completeness, the live deliveries order and ids.
    stored = stored_entries(run.stack.env, run.nodes)
    lost = missing(stored, truth)
    assert not lost, f"{len(lost)} entries not stored by the server, e.g. {sorted(lost)[:5]}"
    for node, got in stored.items():
        assert all(truth[(node, g.seq)] == g.id for g in got), node
    live = run.collector.by_node()
    recovery.extra["entries"] = len(truth)
    recovery.extra["duplicates_live"] = check_ids_and_order(live, truth)
    recovery.extra["missed_live_while_cut_off"] = len(missing(live, truth))
    report(recovery, live, capsys)
    assert pool.stop() == 0, pool.output()[-3000:]


def test_redis_restart_with_aof(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    recovery = Recovery("Redis restart (AOF everysec, 3 s down)")
    pool = start_load(run)
    shards = sorted(pool.shard_pids())
    recovery.begin()
    redis_down(run.stack)
    time.sleep(3.0)  # a real outage: producers and shards find Redis gone
    redis_up(run.stack, run.settings)
    recovery.end()
    truth = run.finish()
    assert run.producer.retried_rounds > 0, "the producer never saw Redis down"
    assert sorted(pool.shard_pids()) == shards, "a shard died instead of waiting for Redis"
    recovery.extra["producer_retried_appends"] = run.producer.retried_rounds
    verdict(run, truth, recovery, capsys)
    assert pool.stop() == 0, pool.output()[-3000:]


def test_ejabberd_stalled_for_ten_seconds(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    recovery = Recovery("ejabberd stalled (SIGSTOP 10 s)")
    pool = start_load(run)
    pid = ejabberd_pid(run.stack)
    recovery.begin()
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2.0)  # what was already on its way is delivered
        frozen_count = run.collector.count()
        time.sleep(STALL_S - 2.0)
        assert run.collector.count() == frozen_count, "deliveries while ejabberd was stopped"
    finally:
        os.kill(pid, signal.SIGCONT)
        recovery.end()
    truth = run.finish()
    verdict(run, truth, recovery, capsys)
    assert pool.stop() == 0, pool.output()[-3000:]
