"""The whole pipeline on a real Redis Cluster (3 masters + 3 replicas, `ops/stack up
--redis-cluster`): stack, bad URLs, Django outbox → relay (WAIT) → pool → an independent
subscriber; a master killed, a replica killed and a shard's slot migrated, all under load.

The tests of this module share one cluster and run in file order: the fault tests leave it
whole again (the killed node restarted as a replica) for the next.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from redis.crc import key_slot

from scalepub.connections import sync_client, wait_replicas
from scalepub.django import nudge
from scalepub.django.models import OutboxEntry
from scalepub.history import read_history
from scalepub.producer import PendingEntry, Refusal, StreamProducer
from scalepub.settings import Settings, SettingsError, env_mapping
from scalepub.sharding import Keys
from scalepub.status import collect
from tests import cluster
from tests.conftest import django_side
from tests.e2e import Collector, Got, PoolProcess, create_nodes, settings_env, wait_until
from tests.stack import REPO, Stack

pytestmark = [pytest.mark.stack, pytest.mark.django_db(transaction=True)]

SHARDS = 8


@pytest.fixture(scope="module")
def cluster_stack() -> Iterator[Stack]:
    """ejabberd and a Redis Cluster on free ports, for this module."""
    yield from cluster.cluster_running()


@pytest.fixture
def cluster_settings(cluster_stack: Stack) -> Iterator[Settings]:
    """The Django side on the cluster (outbox delivery, relay thread), a fresh key prefix."""
    prefix = f"c{uuid.uuid4().hex[:8]}"
    settings = Settings.from_mapping(env_mapping(cluster_stack.env), key_prefix=prefix,
                                     shards=SHARDS, delivery="outbox")
    yield from django_side(settings)
    client = sync_client(settings)
    try:
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
    finally:
        client.close()


def masters_of_shards(stack: Stack, settings: Settings) -> dict[int, int]:
    """shard → port of the master serving its slot."""
    keys = Keys(settings.key_prefix)
    return {s: cluster.master_of_slot(stack, key_slot(keys.stream(s).encode())).port
            for s in range(SHARDS)}


def tweet(prefix: str, count: int, authors: int) -> None:
    call_command("tweet", count=count, authors=authors, rate=0, bulk=0, prefix=prefix,
                 stdout=open(os.devnull, "w"))  # noqa: SIM115


@contextlib.contextmanager
def pipeline(stack: Stack, settings: Settings, authors: int, log: Path,
             *args: str) -> Iterator[tuple[str, list[str], PoolProcess, Collector]]:
    """Nodes of ``authors`` authors, their subscriber and `scalepub run ARGS` on the cluster."""
    prefix = f"{settings.key_prefix}u"
    nodes = [f"/twitter/Tweet/{prefix}{i}" for i in range(authors)]
    create_nodes(stack.env, nodes)
    collector = Collector(stack.env, nodes).start()
    pool = PoolProcess(settings, log, "--shards", str(SHARDS), *args)
    try:
        yield prefix, nodes, pool, collector
    finally:
        pool.kill()
        collector.stop()


def complete_in_order(by_node: dict[str, list[Got]], per_node: int) -> tuple[int, int]:
    """Every node got seqs 1..per_node, first arrivals in seq order; returns (duplicates,
    re-appended): a seq seen again with the same stream id was re-published, with another id
    re-appended (its first append never reached a replica; the seq counter went back with it)."""
    duplicates = reappended = 0
    for node, got in by_node.items():
        first: dict[int, str] = {}
        order = []
        for g in got:
            if g.seq in first:
                duplicates += first[g.seq] == g.id
                reappended += first[g.seq] != g.id
                continue
            first[g.seq] = g.id
            order.append(g.seq)
        assert sorted(first) == list(range(1, per_node + 1)), f"{node}: missing seqs"
        assert order == sorted(order), f"{node}: out of order {order[:20]}"
    return duplicates, reappended


def distinct(collector: Collector) -> int:
    return len({(g.node, g.seq) for g in collector.received})


def outbox_empty() -> bool:
    return not OutboxEntry.objects.exists()


# ------------------------------------------------------------------------------ the stack

def test_stack_runs_a_cluster_and_spreads_eight_shards(cluster_stack: Stack,
                                                       cluster_settings: Settings) -> None:
    status = cluster_stack.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(": master, slots") == 3, status.stdout
    assert status.stdout.count(": replica of 127.0.0.1:") == 3, status.stdout
    assert "redis cluster: state ok" in status.stdout
    port = cluster.cluster_port(cluster_stack)
    assert cluster_stack.env["SCALEPUB_REDIS_URL"] == f"redis+cluster://127.0.0.1:{port}/"
    spread = Counter(masters_of_shards(cluster_stack, cluster_settings).values())
    assert sorted(spread.values()) == [2, 3, 3], spread  # every master, as even as 8/3 goes


def run_pool(env: dict[str, str], url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "scalepub"), "run", "--shards", "2"],
        env={**os.environ, **env, "SCALEPUB_REDIS_URL": url, "SCALEPUB_METRICS_PORT": "0"},
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO)


def test_a_url_of_the_wrong_kind_or_an_unreachable_cluster_is_named(
        cluster_stack: Stack, cluster_settings: Settings) -> None:
    env = settings_env(cluster_settings)
    port = cluster.cluster_port(cluster_stack)
    single_port = cluster_stack.control["SCALEPUB_REDIS_PORT"]
    wrong = run_pool(env, f"redis://127.0.0.1:{port}/0")  # a cluster node as a single Redis
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    assert "REDIS_URL" in wrong.stderr and f"redis+cluster://127.0.0.1:{port}/0" in wrong.stderr
    reverse = run_pool(env, f"redis+cluster://127.0.0.1:{single_port}/")
    assert reverse.returncode == 2, reverse.stderr[-2000:]
    assert "REDIS_URL" in reverse.stderr and "not a Redis Cluster node" in reverse.stderr
    closed = cluster.free_cluster_port()
    gone = run_pool(env, f"redis+cluster://:s3cret@127.0.0.1:{closed}/")
    assert gone.returncode == 5, gone.stderr[-2000:]
    assert f"redis+cluster://:***@127.0.0.1:{closed}/" in gone.stderr
    assert "s3cret" not in gone.stderr + gone.stdout


def test_wait_replicas_setting() -> None:
    assert wait_replicas(Settings(redis_url="redis+cluster://127.0.0.1:7000/")) == 1
    assert wait_replicas(Settings(redis_url="redis://127.0.0.1:6379/0")) == 0
    assert wait_replicas(Settings(redis_url="redis+cluster://h:7000/", redis_wait_replicas=0)) == 0
    with pytest.raises(SettingsError, match=r"REDIS_WAIT_REPLICAS.*0 or more"):
        Settings.from_env({"SCALEPUB_REDIS_WAIT_REPLICAS": "-2"})
    with pytest.raises(SettingsError, match=r"REDIS_URL.*database 0 only"):
        Settings(redis_url="redis+cluster://127.0.0.1:7000/3")


def test_rows_stay_until_a_replica_confirms_and_are_not_appended_twice(
        stack: Stack) -> None:
    """On a Redis without replicas, REDIS_WAIT_REPLICAS=1 cannot be met: the relay's append
    lands but comes back refused (replication), so its rows would stay; appending the same
    rows again once the setting allows answers where they landed, appending nothing."""
    settings = Settings.from_mapping(env_mapping(stack.env), key_prefix=f"w{uuid.uuid4().hex[:8]}",
                                     shards=2, redis_wait_replicas=1, redis_timeout=0.4)
    rows = [PendingEntry(f"/w/n{i % 3}", time.time_ns(), "t.row", str(i), "xml", b"<r/>",
                         oid=i + 1) for i in range(6)]
    waiting = StreamProducer(settings)
    relaxed = StreamProducer(settings.replace(redis_wait_replicas=0))
    try:
        first = waiting.append(rows, source="db1")
        assert not first.appended
        assert {f.reason for f in first.failures} == {Refusal.REPLICATION}
        assert sorted(e.pk for f in first.failures for e in f.entries) == [str(i) for i in range(6)]
        again = relaxed.append(rows, source="db1")
        assert not again.failures and len(again.appended) == 6
        client = sync_client(settings)
        keys = Keys(settings.key_prefix)
        assert sum(int(client.xlen(keys.stream(s))) for s in range(2)) == 6  # no duplicates
        client.close()
    finally:
        waiting.close()
        relaxed.close()


# ------------------------------------------------------------------------------ the pipeline

def test_outbox_relay_pool_and_history_on_the_cluster(cluster_stack: Stack,
                                                      cluster_settings: Settings,
                                                      tmp_path: Path) -> None:
    """Django saves → outbox → relay (WAIT for a replica) → 8 shard streams on 3 masters →
    3 shard processes (several streams of different slots each) → the subscriber."""
    with pipeline(cluster_stack, cluster_settings, 40, tmp_path / "pool.log",
                  "--processes", "3") as (prefix, nodes, pool, collector):
        tweet(prefix, 2_000, 40)
        assert collector.wait_for(lambda got: distinct(collector) >= 2_000, timeout=120), \
            (distinct(collector), pool.output()[-3000:])
        assert wait_until(outbox_empty, 30)
        client = sync_client(cluster_settings)
        try:
            # Delivered is not yet acknowledged: acks ride on a shard's next read, or go on
            # their own within 2 x ACK_RIDE_S (scalepub/shard/acks.py).
            assert wait_until(lambda: all(s.lag == 0 and s.pending == 0 for s in collect(
                cluster_settings, client)), 10), collect(cluster_settings, client)
            statuses = collect(cluster_settings, client)
            history = read_history(client, Keys(cluster_settings.key_prefix), SHARDS, nodes[0],
                                   after=45, limit=10)
        finally:
            client.close()
        assert pool.stop() == 0, pool.output()[-3000:]
    complete_in_order(collector.by_node(), 50)
    masters = masters_of_shards(cluster_stack, cluster_settings)
    assert {s.shard: s.master for s in statuses} == {
        s: f"127.0.0.1:{p}" for s, p in masters.items()}
    assert all(s.lag == 0 and s.pending == 0 for s in statuses), statuses
    assert [e.seq for e in history.entries] == [46, 47, 48, 49, 50] and not history.lost


def test_relay_nudges_use_sharded_pubsub_on_the_cluster(cluster_settings: Settings) -> None:
    """Issue 16 §1: a follower's nudge (SPUBLISH) reaches the leader's subscription
    (SSUBSCRIBE on the master of the channel's slot) and wakes it."""
    client = sync_client(cluster_settings)
    channel = Keys(cluster_settings.key_prefix).relay_nudge("default:test")
    wake, stop = threading.Event(), threading.Event()
    subscriber = nudge.Subscriber(client, channel, wake, stop)
    try:
        assert wait_until(lambda: subscriber.listening, timeout=10)
        wake.clear()  # the wake-up every (re)subscription gives
        assert nudge.send(client, channel)
        assert wake.wait(5)
    finally:
        stop.set()
        subscriber.close()
        client.close()


def test_status_names_the_shards_whose_master_does_not_answer(
        cluster_stack: Stack, cluster_settings: Settings) -> None:
    """A master that does not answer (paused) holds up its own shards only; `status` says
    which, and on which master they wait."""
    masters = masters_of_shards(cluster_stack, cluster_settings)
    stuck = masters[0]
    settings = cluster_settings.replace(redis_timeout=0.3)
    client = sync_client(settings)
    try:
        collect(settings, client)  # the slot map, read while every master answers
        cluster.cli(stuck, "client", "pause", "12000", "all")
        started = time.monotonic()
        statuses = collect(settings, client)
        # each of its shards: the client's retries of 0.3 s timeouts, ~2 s
        assert time.monotonic() - started < 11, "status waited for the paused master"
    finally:
        client.close()
    for s in statuses:
        assert s.master == f"127.0.0.1:{masters[s.shard]}"
        if masters[s.shard] == stuck:
            assert s.state == "unreachable" and s.problem.startswith("redis: "), s
        else:
            assert s.reachable, s
    time.sleep(max(0.0, 12.5 - (time.monotonic() - started)))


# ------------------------------------------------------------------------------ faults

class Watch:
    """Does ``act`` once the subscriber has ``after`` distinct entries (in a thread)."""

    def __init__(self, collector: Collector, after: int, act: Any) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: Any = None

        def run() -> None:
            try:
                if wait_until(lambda: distinct(collector) >= after, 300, 0.05):
                    self.result = act()
            except BaseException as exc:  # reported by the test
                self.error = exc
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def wait(self, timeout: float = 300) -> Any:
        assert self.done.wait(timeout), "the fault was never injected"
        if self.error is not None:
            raise self.error
        return self.result


def under_fault(stack: Stack, settings: Settings, log: Path, entries: int, authors: int,
                fault_at: int, fault: Callable[[Collector], Any]) -> tuple[Any, float, tuple[int, int]]:
    """``entries`` saves over ``authors`` authors through outbox → relay → pool → subscriber,
    ``fault(collector)`` once ``fault_at`` arrived: every entry arrives in per-node order, the
    outbox empties and the pool stops cleanly. Returns what the fault returned, the seconds
    from the first save to the last delivery and ``complete_in_order``'s counts."""
    with pipeline(stack, settings, authors, log) as (prefix, _nodes, pool, collector):
        watch = Watch(collector, fault_at, lambda: fault(collector))
        started = time.monotonic()
        tweet(prefix, entries, authors)
        result = watch.wait()
        assert collector.wait_for(lambda got: distinct(collector) >= entries, timeout=300), \
            (distinct(collector), pool.output()[-3000:])
        elapsed = time.monotonic() - started
        assert wait_until(outbox_empty, 60)
        assert pool.stop() == 0, pool.output()[-3000:]
    return result, elapsed, complete_in_order(collector.by_node(), entries // authors)


@pytest.mark.slow
def test_kill_minus_nine_of_a_master_under_load_loses_nothing(
        cluster_stack: Stack, cluster_settings: Settings, tmp_path: Path) -> None:
    """20,000 saves; the master of shard 0's slot is killed with SIGKILL while the relay
    appends and the pool reads; its replica takes over: every entry arrives, per-node order
    kept. Prints the failover time (kill → replica serving as master)."""
    victim = masters_of_shards(cluster_stack, cluster_settings)[0]
    [replica] = [n for n in cluster.nodes(cluster_stack)
                 if n.master_id == _node_id(cluster_stack, victim)]

    def kill(collector: Collector) -> dict[str, float]:
        started = time.monotonic()
        cluster.kill_node(cluster_stack, victim)
        promoted = wait_until(lambda: _is_master(cluster_stack, replica.port), 60, 0.05)
        failover = time.monotonic() - started
        # The new master has no replica, so WAIT holds its shards' rows in the outbox until
        # the old master is back (as a replica): what a supervisor restarting Redis does.
        time.sleep(2)
        cluster.restart_node(cluster_stack, victim)
        return {"failover_s": failover, "promoted": float(promoted), "at": distinct(collector),
                "back_s": time.monotonic() - started}

    figures, elapsed, (duplicates, reappended) = under_fault(
        cluster_stack, cluster_settings, tmp_path / "pool.log", 20_000, 200, 3_000, kill)
    assert figures["promoted"], "the replica never became master"
    assert wait_until(lambda: cluster_stack.run("status").returncode == 0, 60)
    print(f"\nmaster {victim} killed after {figures['at']:.0f} of 20,000 entries: replica "
          f"{replica.port} master after {figures['failover_s']:.2f} s, old master back as its "
          f"replica after {figures['back_s']:.1f} s; all 20,000 delivered in "
          f"{elapsed:.1f} s, order kept, {duplicates} re-published, {reappended} re-appended")


def _node_id(stack: Stack, port: int) -> str:
    return next(n.node_id for n in cluster.nodes(stack) if n.port == port)


def _is_master(stack: Stack, port: int) -> bool:
    try:
        return any(n.port == port and n.master for n in cluster.nodes(stack, port))
    except RuntimeError:
        return False


@pytest.mark.slow
def test_a_replica_killed_under_load_loses_nothing(
        cluster_stack: Stack, cluster_settings: Settings, tmp_path: Path) -> None:
    """5,000 saves; the replica of shard 1's master dies under load: that master's rows wait in the outbox
    (WAIT cannot be met), the other shards go on; once it is back, every entry arrives."""
    master = masters_of_shards(cluster_stack, cluster_settings)[1]
    [replica] = [n for n in cluster.nodes(cluster_stack)
                 if n.master_id == _node_id(cluster_stack, master)]

    def kill(_collector: Collector) -> None:
        cluster.kill_node(cluster_stack, replica.port)
        time.sleep(3)
        cluster.restart_node(cluster_stack, replica.port)

    under_fault(cluster_stack, cluster_settings, tmp_path / "pool.log", 5_000, 100, 1_000, kill)
    assert wait_until(lambda: cluster_stack.run("status").returncode == 0, 60)


@pytest.mark.slow
def test_a_shard_slot_migrated_under_load_loses_nothing(
        cluster_stack: Stack, cluster_settings: Settings, tmp_path: Path) -> None:
    """`redis-cli --cluster reshard` moves the first slots of a master, shard 3's among them,
    to another master while the relay appends and the pool reads (ASK/TRYAGAIN, then MOVED)."""
    keys = Keys(cluster_settings.key_prefix)
    slot = key_slot(keys.stream(3).encode())
    source = cluster.master_of_slot(cluster_stack, slot)
    first = int(source.slots.split()[0].split("-")[0])
    assert first <= slot, source.slots
    target = next(n for n in cluster.nodes(cluster_stack)
                  if n.master and not n.failed and n.port != source.port)

    def reshard(_collector: Collector) -> str:
        done = subprocess.run(
            ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}",
             "--cluster-from", source.node_id, "--cluster-to", target.node_id,
             "--cluster-slots", str(slot - first + 1), "--cluster-yes"],
            capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done.stdout

    under_fault(cluster_stack, cluster_settings, tmp_path / "pool.log", 5_000, 100, 1_000, reshard)
    assert cluster.master_of_slot(cluster_stack, slot).port == target.port
