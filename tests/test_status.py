"""`scalepub status`: liveness from heartbeats, stuck detection, exit codes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from scalepub import exitcodes
from scalepub.backlog import stream_backlog
from scalepub.producer import PendingEntry, Refusal, StreamProducer
from scalepub.settings import Settings, env_mapping
from scalepub.sharding import CONSUMER_GROUP, Keys, shard_for
from scalepub.status import RelayStatus, ShardStatus, healthy, relay_lines, table
from tests.e2e import PoolProcess, create_nodes, settings_env, wait_until
from tests.stack import Stack, running
from tests.streams import FencedConsumer, produce

SCALEPUB = str(Path(sys.executable).parent / "scalepub")


def status_document(settings: Settings) -> tuple[int, dict[str, list[dict[str, object]]]]:
    done = subprocess.run([SCALEPUB, "status", "--json"], capture_output=True, text=True,
                          env={**os.environ, **settings_env(settings)}, timeout=30, check=False)
    return done.returncode, json.loads(done.stdout)


def status(settings: Settings) -> tuple[int, list[dict[str, object]]]:
    code, document = status_document(settings)
    return code, document["shards"]


def row(**kw: object) -> ShardStatus:
    base: dict[str, object] = dict(shard=0, length=10, lag=0, pending=0, dead_letters=0,
                                   alive=True, pid=1, host="h", last_publish_age_s=1.0, rate=0.0)
    return ShardStatus(**{**base, **kw})  # type: ignore[arg-type]


def test_states() -> None:
    assert row().state == "ok"
    assert row(alive=False).state == "dead"
    assert row(lag=5, last_publish_age_s=120.0).state == "stuck"
    assert row(pending=5, last_publish_age_s=None).state == "stuck"
    assert row(lag=0, pending=0, last_publish_age_s=None).state == "ok"  # idle is fine
    assert row(lag=5, mismatch=True).state == "mismatch" and not healthy([row(mismatch=True)])


@pytest.mark.stack
def test_status_names_a_shard_count_mismatch(settings_for: Settings,
                                             redis_client: redis.Redis) -> None:
    """Entries written for 8 shards wait while the pool recorded 4: every such stream, those
    beyond the pool's count included, is shown with the reason, and status is unhealthy; with
    no pool yet, status with another SHARDS than the producers' says so too."""
    producers = settings_for.replace(shards=8)
    nodes = [f"/status/mismatch/n{i}" for i in range(40)]
    produce(producers, nodes, 1)
    # A pool that recorded 4 (producers now refuse to append for 8, tests/test_producer.py;
    # these entries came before, as from a producer that read the count before it changed).
    redis_client.set(Keys(settings_for.key_prefix).shard_count, 4)
    written = {shard_for(n, 8) for n in nodes}
    assert written - set(range(4)), "some streams lie beyond the pool's 4"
    code, rows = status(producers)
    assert code == exitcodes.UNHEALTHY
    flagged = {r["shard"]: r for r in rows if r["state"] == "mismatch"}
    assert set(flagged) == written, rows  # shown beyond the pool's count too
    assert all("written for 8 shards" in str(r["problem"]) and "pool runs with 4"
               in str(r["problem"]) for r in flagged.values())

    fresh = settings_for.replace(key_prefix=f"{settings_for.key_prefix}x")  # no pool ran
    produce(fresh.replace(shards=8), nodes[:10], 1)
    code, rows = status(fresh.replace(shards=2))
    assert code == exitcodes.UNHEALTHY
    waiting = [r for r in rows if r["lag"]]
    assert waiting and {r["state"] for r in waiting} == {"mismatch"}
    assert all("SHARDS is 2 (no pool ran yet)" in str(r["problem"]) for r in waiting)
    for key in redis_client.scan_iter(match=f"{fresh.key_prefix}:*"):
        redis_client.delete(key)


@pytest.mark.stack
def test_status_follows_the_pool(settings_for: Settings, stack: Stack, tmp_path: Path) -> None:
    settings = settings_for.replace(shards=2)
    nodes = [f"/status/{uuid.uuid4().hex[:8]}/n{i}" for i in range(4)]
    create_nodes(stack.env, nodes)
    code, rows = status(settings)
    assert code == exitcodes.UNHEALTHY and {r["state"] for r in rows} == {"dead"}
    produce(settings, nodes, 50)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "2", "--metrics-port", "0")
    try:
        assert wait_until(lambda: status(settings)[0] == exitcodes.OK, 30), pool.output()
        code, rows = status(settings)
        assert sum(int(r["length"]) for r in rows) == 200  # type: ignore[call-overload]
        assert all(r["alive"] and r["pid"] for r in rows)
        [victim, _] = pool.shard_pids()
        os.kill(victim, signal.SIGSTOP)  # a frozen shard stops refreshing its heartbeat
        produce(settings, nodes, 50)
        try:
            assert wait_until(lambda: status(settings)[0] == exitcodes.UNHEALTHY, 30)
        finally:
            os.kill(victim, signal.SIGCONT)
        assert wait_until(lambda: status(settings)[0] == exitcodes.OK, 30)
    finally:
        pool.kill()


@pytest.fixture(scope="module")
def restart_stack() -> Iterator[Stack]:
    """A private Redis + ejabberd: this module restarts its Redis."""
    yield from running()


def _rewrite_aof(client: redis.Redis) -> None:
    client.bgrewriteaof()
    assert wait_until(lambda: not int(client.info("persistence")["aof_rewrite_in_progress"])
                      and not int(client.info("persistence")["aof_rewrite_scheduled"]), 30)


@pytest.mark.stack
@pytest.mark.timeout(300)
def test_lag_is_true_after_an_aof_rewrite_and_a_restart(restart_stack: Stack,
                                                        tmp_path: Path) -> None:
    """Deliver, BGREWRITEAOF, deliver, restart Redis, deliver: no phantom lag, no refusal."""
    settings = Settings.from_mapping(env_mapping(restart_stack.env),
                                     key_prefix=f"a{uuid.uuid4().hex[:8]}", shards=2,
                                     stream_maxlen=400)
    nodes = [f"/status/aof/{settings.key_prefix}/n{i}" for i in range(8)]
    create_nodes(restart_stack.env, nodes)
    client = redis.Redis.from_url(settings.redis_url)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "2")

    def settled() -> bool:
        code, rows = status(settings)
        return code == exitcodes.OK and all(r["lag"] == r["pending"] == 0 for r in rows)

    try:
        for cycle in range(2):
            produce(settings, nodes, 20)
            assert wait_until(settled, 60), (cycle, status(settings), pool.output()[-2000:])
            _rewrite_aof(client)
            produce(settings, nodes, 20)
            assert wait_until(settled, 60), (cycle, status(settings), pool.output()[-2000:])
            done = restart_stack.run("restart", "redis")
            assert done.returncode == 0, done.stderr
            produce(settings, nodes, 20)
            assert wait_until(settled, 60), (cycle, status(settings), pool.output()[-2000:])
        # Backpressure counts what really waits: none, so a full STREAM_MAXLEN is admitted.
        producer = StreamProducer(settings.replace(shards=2))
        node = nodes[0]
        result = producer.append([PendingEntry(node, time.time_ns(), "t.row", str(i), "xml",
                                               b"<x/>") for i in range(380)])
        producer.close()
        assert not result.failures and len(result.appended) == 380, result.failures
        assert wait_until(settled, 60), (status(settings), pool.output()[-2000:])
    finally:
        pool.kill()
        client.close()


def relay(**kw: object) -> RelayStatus:
    base: dict[str, object] = dict(database="default:1", rows=0, oldest_age_s=0.0,
                                   refusing=False, pid=1, host="h", report_age_s=1.0)
    return RelayStatus(**{**base, **kw})  # type: ignore[arg-type]


def test_relay_states_and_reasons() -> None:
    assert relay().state == "ok" and healthy([row()], [relay()])
    assert relay(oldest_age_s=60.0).state == "behind" and not healthy([], [relay(
        oldest_age_s=60.0)])
    assert relay(stale=True).state == "stale"
    assert healthy([], [relay(stale=True)])  # an old report of an empty outbox
    assert not healthy([], [relay(stale=True, rows=5)])  # rows may wait with no relay
    line = relay_lines([relay(refusing=True, refused_reason="shard_mismatch", rows=3)])
    assert "Redis refusing (shard_mismatch)" in line and "?" not in line
    assert "stale" in relay_lines([relay(stale=True)])
    assert "problem: XMPP server unreachable" in table([row(problem="XMPP server unreachable")])
    assert "problem" not in table([row()])


@pytest.mark.stack
def test_status_shows_reported_problems_and_stale_reports(
    settings_for: Settings, redis_client: redis.Redis
) -> None:
    """What the worker and the relay write is what `scalepub status --json` shows."""
    keys = Keys(settings_for.key_prefix)
    redis_client.hset(keys.heartbeat(0), mapping={
        "pid": 42, "host": "h", "rate": 0, "problem": "shard count mismatch: 8 vs 4"})
    now = time.time()
    redis_client.hset(keys.relay_state("fresh"), mapping={
        "rows": 7, "oldest_age_s": 1.5, "refusing": 1, "refused_reason": "backpressure",
        "pid": 1, "host": "h", "at": now})
    redis_client.hset(keys.relay_state("old"), mapping={
        "rows": 9, "oldest_age_s": 1.0, "refusing": 0, "pid": 2, "host": "h",
        "at": now - 60, "ttl_s": 30})
    code, document = status_document(settings_for)
    shard0 = document["shards"][0]
    assert shard0["problem"] == "shard count mismatch: 8 vs 4" and shard0["alive"]
    assert all(r["problem"] == "" for r in document["shards"][1:])
    relays = {r["database"]: r for r in document["relays"]}
    assert relays["fresh"]["refused_reason"] == "backpressure"
    assert relays["fresh"]["state"] == "ok" and not relays["fresh"]["stale"]
    assert relays["old"]["state"] == "stale" and relays["old"]["stale"]
    assert code == exitcodes.UNHEALTHY  # 3 shards dead, and a stale report of 9 rows


@pytest.mark.stack
def test_backlog_ignores_the_group_lag_redis_reports(settings_for: Settings,
                                                     redis_client: redis.Redis) -> None:
    """A group whose entries-read is wrong (as after an AOF rewrite and restart) changes
    nothing: lag and backpressure come from scalepub's own counters."""
    settings = settings_for.replace(shards=1, stream_maxlen=100)
    producer = StreamProducer(settings)
    key = Keys(settings.key_prefix).stream(0)

    async def deliver(count: int) -> None:
        async with FencedConsumer(settings) as shard:
            await shard.ack([sid for sid, _ in await shard.read(count)])

    def entries(n: int) -> list[PendingEntry]:
        return [PendingEntry("/n/lag", time.time_ns(), "t.row", str(i), "xml", b"<x/>")
                for i in range(n)]

    assert not producer.append(entries(60)).failures
    asyncio.run(deliver(60))
    last = redis_client.xinfo_groups(key)[0]["last-delivered-id"]
    redis_client.execute_command(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        "XGROUP", "SETID", key, CONSUMER_GROUP, last,
        "ENTRIESREAD", 1)  # Redis now reports a lag of 59
    assert redis_client.xinfo_groups(key)[0]["lag"] == 59
    assert stream_backlog(redis_client, key) == (0, 0)
    assert not producer.append(entries(90)).failures  # 90 of 100 waiting: admitted
    assert stream_backlog(redis_client, key) == (90, 0)
    asyncio.run(deliver(30))
    assert stream_backlog(redis_client, key) == (60, 0)
    assert [f.reason for f in producer.append(entries(50)).failures] == [Refusal.BACKPRESSURE]
    producer.close()
