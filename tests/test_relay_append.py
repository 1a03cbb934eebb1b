"""The relay's appends on a connection of their own (``producer.AppendConnection``): kept across
calls (no pool checkout per call), several shards in one pipeline, and the same outcomes as
through redis-py's client after a script flush, a killed connection and a shard's refusal."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from scalepub.producer import PendingEntry, Refusal, StreamProducer
from scalepub.settings import Settings
from scalepub.sharding import Keys, shard_for
from tests.streams import read_all

pytestmark = [pytest.mark.stack]

NODES = [f"/relay/append/{i}" for i in range(12)]


def entries(start: int, count: int) -> list[PendingEntry]:
    """``count`` entries over NODES, with outbox ids (what the relay appends)."""
    return [PendingEntry(NODES[i % len(NODES)], time.time_ns(), "app.model", str(i), "xml",
                         f"<x>{i}</x>".encode(), oid=i) for i in range(start, start + count)]


@pytest.fixture
def producer(settings_for: Settings) -> Any:
    p = StreamProducer(settings_for, single_thread=True)
    yield p
    p.close()


def test_appends_keep_one_connection_and_land_once(
        producer: StreamProducer, settings_for: Settings, redis_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    first = producer.append(entries(0, 24), source="db")
    assert len(first.appended) == 24 and not first.failures
    assert len({a.shard for a in first.appended}) > 1  # one pipeline over several shards
    checkouts: list[object] = []
    pool = producer.client.connection_pool
    original = pool.get_connection

    def counted(*args: Any, **kwargs: Any) -> Any:
        checkouts.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counted)
    for start in range(24, 64, 8):
        assert len(producer.append(entries(start, 8), source="db").appended) == 8
    assert checkouts == []
    stored = read_all(redis_client, settings_for)
    assert sorted(int(s.env.pk) for s in stored) == list(range(64))
    for node in NODES:
        assert [s.env.seq for s in stored if s.env.node == node] == list(
            range(1, 1 + sum(1 for s in stored if s.env.node == node)))


def test_a_script_flush_and_a_killed_connection_lose_nothing(
        producer: StreamProducer, settings_for: Settings, redis_client: redis.Redis) -> None:
    assert len(producer.append(entries(0, 12), source="db").appended) == 12
    redis_client.script_flush()  # NOSCRIPT: loaded again, the call sent again
    assert len(producer.append(entries(12, 12), source="db").appended) == 12
    redis_client.client_kill_filter(_type="normal", skipme=True)  # the kept connection too
    assert len(producer.append(entries(24, 12), source="db").appended) == 12
    assert sorted(int(s.env.pk) for s in read_all(redis_client, settings_for)) == list(range(36))


def test_a_refusing_shard_does_not_stop_the_others(
        producer: StreamProducer, settings_for: Settings, redis_client: redis.Redis) -> None:
    assert len(producer.append(entries(0, 12), source="db").appended) == 12
    refusing = shard_for(NODES[0], settings_for.shards)
    redis_client.hset(Keys(settings_for.key_prefix).meta(refusing), "shards",
                      settings_for.shards + 1)
    batch = entries(12, 24)
    result = producer.append(batch, source="db")
    [failure] = result.failures
    assert failure.shard == refusing and failure.reason is Refusal.SHARD_MISMATCH
    expected = [e for e in batch if shard_for(e.node, settings_for.shards) != refusing]
    assert len(result.appended) == len(expected) > 0
    assert len(producer.append(entries(36, 1), source="db").failures) == (
        shard_for(NODES[36 % len(NODES)], settings_for.shards) == refusing)
