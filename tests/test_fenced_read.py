"""The shard's read round trip against real Redis: acks ride on the fenced read, the scripts
go by SHA1 and come back after Redis lost them, an old owner's ride is refused.

(lease.ShardLease.read_new with acks.Ride; the fenced read alone: tests/test_leases.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis
import redis.asyncio as aredis

from scalepub.connections import shard_client
from scalepub.settings import Settings
from scalepub.shard import streams
from scalepub.shard.acks import FENCED_ACK, Acks
from scalepub.shard.heartbeat import Health
from scalepub.shard.lease import FENCED_READ, LeaseTiming, ShardLease
from scalepub.shard.stats import Meters, Stats
from scalepub.sharding import CONSUMER_GROUP, Keys
from tests.streams import produce

NODE = "/fenced/read"


def _lease(client: aredis.Redis, settings: Settings, owner: str) -> ShardLease:
    return ShardLease(client, Keys(settings.key_prefix), 0, owner, LeaseTiming(5.0, 1.0))


def _acks(client: aredis.Redis, settings: Settings, lease: ShardLease) -> Acks:
    async def once(call: Callable[[], Awaitable[None]]) -> None:
        await call()
    return Acks("0", client, Keys(settings.key_prefix), Stats(), Meters("0"), Health(), once,
                lambda _coro: None, lease, ride_s=0.15)


async def _read(lease: ShardLease, client: aredis.Redis, stream: str, acks: Acks,
                count: int = 10, block_ms: int = 100) -> list[bytes]:
    replies = await lease.read_new(client, [stream], "shard-0", count, block_ms, acks.ride(0))
    return [sid for _, entries in replies for sid, _ in entries]


@contextlib.asynccontextmanager
async def _owner(settings: Settings, stream: str) -> AsyncIterator[
        tuple[aredis.Redis, ShardLease, Acks]]:
    """Shard 0's group made and its lease held by "A": the client, the lease and its Acks;
    the lease released and the client closed after."""
    client = shard_client(settings)
    await streams.ensure_group(client, stream)
    lease = _lease(client, settings, "A")
    assert await lease.acquire(asyncio.Event())
    yield client, lease, _acks(client, settings, lease)
    await lease.release()
    await client.aclose()


@pytest.fixture
def one_shard(settings_for: Settings) -> Settings:
    return settings_for.replace(shards=1)


def test_acks_ride_on_the_read_and_the_read_waits_for_new_entries(
        one_shard: Settings, redis_client: redis.Redis) -> None:
    """The acks gathered go with the next read (no flush of their own), which takes what is
    new; with everything taken the next read first waits, and an entry ends the wait."""
    stream = Keys(one_shard.key_prefix).stream(0)
    produce(one_shard, [NODE], 3)

    async def go() -> None:
        async with _owner(one_shard, stream) as (client, lease, acks):
            ids = await _read(lease, client, stream, acks)
            assert len(ids) == 3
            acks.add(0, ids[:2])
            started = time.monotonic()
            assert await _read(lease, client, stream, acks) == []  # waited: nothing new
            assert time.monotonic() - started >= 0.09
            assert acks.take(0) == []  # the ride took them
            assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 1
            waiting = asyncio.create_task(_read(lease, client, stream, acks, block_ms=5000))
            await asyncio.sleep(0.1)
            await asyncio.to_thread(produce, one_shard, [NODE], 1)
            assert len(await asyncio.wait_for(waiting, 2)) == 1  # woken, and taken at once
    asyncio.run(go())
    meta = redis_client.hgetall(Keys(one_shard.key_prefix).meta(0))
    assert meta[b"done"] == b"2"


def test_scripts_lost_by_redis_are_sent_again(one_shard: Settings,
                                             redis_client: redis.Redis) -> None:
    """After SCRIPT FLUSH (a restart or failover loses the script cache too) the read and the
    acks riding on it still run, once, and EVALSHA works again afterwards."""
    stream = Keys(one_shard.key_prefix).stream(0)
    produce(one_shard, [NODE], 2)

    async def go() -> None:
        async with _owner(one_shard, stream) as (client, lease, acks):
            first = await _read(lease, client, stream, acks, count=1)
            acks.add(0, first)
            redis_client.script_flush()
            assert redis_client.script_exists(FENCED_READ.sha, FENCED_ACK.sha) == [False, False]
            assert len(await _read(lease, client, stream, acks)) == 1  # no wait: count was full
            assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 1
            assert redis_client.script_exists(FENCED_READ.sha, FENCED_ACK.sha) == [True, True]
            redis_client.script_flush()  # now while the read waits (XREAD ran, the script not)
            await asyncio.to_thread(produce, one_shard, [NODE], 1)
            assert len(await _read(lease, client, stream, acks)) == 1
    asyncio.run(go())
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 2


@pytest.mark.parametrize("cached", ["read", "ack"])
def test_only_what_lacked_its_script_is_sent_again(cached: str, one_shard: Settings,
                                                   redis_client: redis.Redis) -> None:
    """Redis had one of the two scripts (the other was flushed, or loaded elsewhere since):
    what ran is not run again. A read run twice would take entries and drop the reply, and
    they would wait in the pending list unseen (a first version lost entries this way)."""
    stream = Keys(one_shard.key_prefix).stream(0)
    produce(one_shard, [NODE], 2)

    async def go() -> None:
        async with _owner(one_shard, stream) as (client, lease, acks):
            first = await _read(lease, client, stream, acks, count=1)
            acks.add(0, first)
            redis_client.script_flush()
            redis_client.script_load(FENCED_READ.body if cached == "read" else FENCED_ACK.body)
            assert len(await _read(lease, client, stream, acks)) == 1  # the second entry
    asyncio.run(go())
    pending = redis_client.xpending(stream, CONSUMER_GROUP)["pending"]
    assert pending == 1  # the second entry, read once; the first acked
    assert redis_client.script_exists(FENCED_READ.sha, FENCED_ACK.sha) == [True, True]


def test_an_old_owner_s_ride_is_refused(one_shard: Settings,
                                        redis_client: redis.Redis) -> None:
    """After a takeover the old owner's acks riding on its read are refused (its entries stay
    pending for the new owner) and the read takes nothing."""
    stream = Keys(one_shard.key_prefix).stream(0)
    produce(one_shard, [NODE], 2)

    async def go() -> None:
        client = shard_client(one_shard)
        await streams.ensure_group(client, stream)
        old = _lease(client, one_shard, "A")
        assert await old.acquire(asyncio.Event())
        acks = _acks(client, one_shard, old)
        ids = await _read(old, client, stream, acks)
        await old.release()
        new = _lease(client, one_shard, "B")
        assert await new.acquire(asyncio.Event())
        await asyncio.to_thread(produce, one_shard, [NODE], 1)
        acks.add(0, ids)
        assert await _read(old, client, stream, acks) == []
        assert old.lost_reason.startswith("taken over")
        assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 2  # not acked
        assert len(await _read(new, client, stream, _acks(client, one_shard, new))) == 1
        await new.release()
        await client.aclose()
    asyncio.run(go())


def test_a_failed_ride_gives_its_acks_back(one_shard: Settings) -> None:
    """Redis unreachable: the read raises and the acks wait for the next flush or ride."""
    settings = one_shard.replace(redis_url="redis://127.0.0.1:1/0")

    async def go() -> None:
        client = shard_client(settings)
        lease = _lease(client, settings, "A")
        acks = _acks(client, settings, lease)
        acks.add(0, [b"1-1", b"1-2"])
        with pytest.raises(redis.ConnectionError):
            await _read(lease, client, Keys(settings.key_prefix).stream(0), acks)
        assert acks.take(0) == [b"1-1", b"1-2"]
        await client.aclose()
    asyncio.run(go())
