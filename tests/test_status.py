"""`scalepub status`: liveness from heartbeats, stuck detection, exit codes."""

from __future__ import annotations

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
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings, env_mapping
from scalepub.status import ShardStatus
from tests.e2e import PoolProcess, create_nodes, settings_env, wait_until
from tests.stack import Stack, new_stack
from tests.test_pool_faults import produce

SCALEPUB = str(Path(sys.executable).parent / "scalepub")


def status(settings: Settings) -> tuple[int, list[dict[str, object]]]:
    done = subprocess.run([SCALEPUB, "status", "--json"], capture_output=True, text=True,
                          env={**os.environ, **settings_env(settings)}, timeout=30, check=False)
    return done.returncode, json.loads(done.stdout)["shards"]


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
    s = new_stack()
    try:
        s.up()
        yield s
    finally:
        s.down()


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
