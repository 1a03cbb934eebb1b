"""The heartbeat's ``problem`` field: why a live shard cannot publish right now.

Against the real Redis and ejabberd: a pool whose XMPP connection is cut (a TCP relay the test
closes) reports ``xmpp_down`` until the server is reachable again; a pool whose account may
not publish to a node reports the server's refusal; a healthy one reports nothing.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import cast

import pytest
import redis

from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.shard.heartbeat import Health
from scalepub.sharding import CONSUMER_GROUP, Keys
from tests.e2e import CuttableRelay, PoolProcess, create_nodes, wait_until
from tests.stack import Stack
from tests.test_security import register


def test_problem_names_each_cause_until_it_passes() -> None:
    health = Health()
    assert health.problem == ""
    health.xmpp_down = True
    health.redis_failing = 2
    health.refused("/a", "wait", "resource-constraint")
    health.refused("/b", "wait", "resource-constraint")
    health.refused("/c", "auth", "forbidden")
    assert health.problem == ("xmpp_down, redis, refused: auth/forbidden, "
                              "refused: wait/resource-constraint")
    health.xmpp_down, health.redis_failing = False, 0
    health.passed("/c")
    health.passed("/a")
    assert health.problem == "refused: wait/resource-constraint"
    health.passed("/b")
    assert health.problem == ""


def problem(client: redis.Redis, settings: Settings) -> bytes | None:
    value = cast(bytes | None, client.hget(Keys(settings.key_prefix).heartbeat(0), "problem"))
    return value if value is None else bytes(value)


def produce_one(settings: Settings, node: str) -> None:
    producer = StreamProducer(settings)
    producer.enqueue([PendingEntry(node, time.time_ns(), "t.row", "1", "xml", b"<row/>")])
    producer.close()


@pytest.mark.stack
def test_a_cut_connection_shows_as_xmpp_down_until_it_is_back(
        settings_for: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path) -> None:
    relay = CuttableRelay(int(stack.env["SCALEPUB_XMPP_PORT"]))
    relay.open()
    settings = settings_for.replace(shards=1, xmpp_port=relay.port)
    node = f"/heartbeat/{settings.key_prefix}/down"
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        assert wait_until(lambda: problem(redis_client, settings) == b"", 60), pool.output()
        relay.cut()
        assert wait_until(lambda: problem(redis_client, settings) == b"xmpp_down", 30), (
            problem(redis_client, settings), pool.output()[-3000:])
        produce_one(settings, node)  # waits for the link
        relay.open()
        assert wait_until(lambda: problem(redis_client, settings) == b"", 30), (
            problem(redis_client, settings), pool.output()[-3000:])
        assert wait_until(lambda: redis_client.hget(Keys(settings.key_prefix).heartbeat(0),
                                                    "published") == b"1", 30)
        assert pool.stop() == 0
    finally:
        pool.kill()
        relay.cut()


@pytest.mark.stack
def test_a_refusal_being_retried_shows_the_servers_condition(
        settings_for: Settings, stack: Stack, redis_client: redis.Redis, tmp_path: Path) -> None:
    node = f"/heartbeat/{settings_for.key_prefix}/owned"
    create_nodes(stack.env, [node])  # owned by the publisher account
    jid, password = register(stack, f"other{uuid.uuid4().hex[:6]}")
    settings = settings_for.replace(shards=1, xmpp_jid=jid, xmpp_password=password)
    pool = PoolProcess(settings, tmp_path / "pool.log", "--shards", "1")
    try:
        assert wait_until(lambda: problem(redis_client, settings) == b"", 60), pool.output()
        produce_one(settings, node)
        assert wait_until(lambda: problem(redis_client, settings) == b"refused: auth/forbidden",
                          30), (problem(redis_client, settings), pool.output()[-3000:])
        assert pool.stop() == 0
    finally:
        pool.kill()
    # retried, not dropped: the entry waits, unacknowledged, for an account that may publish
    keys = Keys(settings.key_prefix)
    assert redis_client.xlen(keys.dead(0)) == 0
    assert redis_client.xpending(keys.stream(0), CONSUMER_GROUP)["pending"] == 1
