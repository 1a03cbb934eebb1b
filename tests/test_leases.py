"""Shard leases: the pure parts (spread, slots, timing) and the Redis scripts against real Redis.

The fault tests with whole supervisors are in tests/test_leases_faults.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import cast

import pytest
import redis
import redis.asyncio as aredis

from scalepub.settings import Settings, SettingsError
from scalepub.shard import streams
from scalepub.shard.acks import FENCED, FENCED_ACK_LUA
from scalepub.shard.lease import LeaseTiming, ShardLease, parse_fence
from scalepub.shard.membership import Registry, spread, supervisor_id
from scalepub.shard.pool import slot_shards
from scalepub.sharding import CONSUMER_GROUP, Keys
from scalepub.status import collect, collect_supervisors, supervisor_lines, table
from tests.streams import RawRead, produce

# --- pure parts -------------------------------------------------------------------------


@pytest.mark.parametrize("shards", [1, 2, 7, 8, 64, 100])
@pytest.mark.parametrize("members", [1, 2, 3, 5, 9])
def test_spread_gives_every_shard_once_and_counts_within_one(shards: int, members: int) -> None:
    ids = [f"host{i}-{i * 37}-abc" for i in range(members)]
    out = spread(shards, ids)
    owned = sorted(s for mine in out.values() for s in mine)
    assert owned == list(range(shards))
    counts = [len(mine) for mine in out.values()]
    assert max(counts) - min(counts) <= 1
    assert spread(shards, list(reversed(ids))) == out  # same ids, same answer everywhere


def test_spread_of_no_member_is_empty_and_duplicates_count_once() -> None:
    assert spread(8, []) == {}
    assert spread(4, ["a", "a", "b"]) == spread(4, ["b", "a"])


@pytest.mark.parametrize("members", [2, 3, 4, 5])
def test_a_join_moves_little_more_than_the_newcomer_s_share(members: int) -> None:
    shards = 100
    before = spread(shards, [f"s{i}" for i in range(members)])
    after = spread(shards, [f"s{i}" for i in range(members + 1)])
    owner = {s: m for m, mine in before.items() for s in mine}
    owner_after = {s: m for m, mine in after.items() for s in mine}
    moved = sum(owner[s] != owner_after[s] for s in range(shards))
    share = shards / (members + 1)
    assert share <= moved <= 1.6 * share + 1, moved  # a round robin moves ~all of them


def test_slots_one_per_shard_by_default_else_shards_stay_in_their_process() -> None:
    assert slot_shards([3, 5], None) == {3: [3], 5: [5]}
    assert slot_shards([7, 1, 3, 5], 2) == {0: [1, 5], 1: [3, 7]}
    assert slot_shards([], 3) == {0: [], 1: [], 2: []}
    # A shard never moves between two processes of one supervisor: both would be the same
    # owner of its lease at once. Shards given up leave; new ones fill the emptiest slot.
    assert slot_shards([1, 3, 4, 6], 2, {0: [1, 5], 1: [3, 7]}) == {0: [1, 4], 1: [3, 6]}
    assert slot_shards([1, 5, 2], 2, {0: [1, 5], 1: [3, 7]}) == {0: [1, 5], 1: [2]}


def test_timing_stops_before_the_lease_can_expire_in_redis() -> None:
    timing = LeaseTiming(ttl_s=2.0, renew_s=0.5)
    sent = 100.0
    # Redis keeps the lease until at least sent + ttl (it starts the TTL when it runs the
    # renewal, after it was sent); the holder stops a margin before.
    assert timing.valid_until(sent) == pytest.approx(sent + 2.0 - timing.margin_s)
    assert timing.margin_s >= 0.1 and timing.valid_until(sent) < sent + timing.ttl_s
    assert LeaseTiming(5.0, 1.0).margin_s == pytest.approx(1.0)
    assert LeaseTiming(0.2, 0.1).margin_s == pytest.approx(0.1)
    # A renewal may wait for Redis at most until the deadline (and never less than 50 ms).
    assert timing.call_timeout(now=sent, deadline=sent + 0.3) == pytest.approx(0.3)
    assert timing.call_timeout(now=sent, deadline=sent + 9) == pytest.approx(0.5)
    assert timing.call_timeout(now=sent + 5, deadline=sent) == pytest.approx(0.05)
    assert timing.ttl_ms() == 2000


def test_lease_settings_are_checked_naming_them() -> None:
    assert Settings().lease_ttl_s <= 5.0
    with pytest.raises(SettingsError, match="SCALEPUB_LEASE_RENEW_S: must be at most half of "
                                            "SCALEPUB_LEASE_TTL_S"):
        Settings.from_env({"SCALEPUB_LEASE_TTL_S": "2", "SCALEPUB_LEASE_RENEW_S": "1.5"})
    with pytest.raises(SettingsError, match="SCALEPUB_LEASE_TTL_S: must be greater than 0"):
        Settings.from_env({"SCALEPUB_LEASE_TTL_S": "0"})
    with pytest.raises(SettingsError, match="--lease-renew-s"):
        Settings().replace(lease_renew_s=4.0)


def test_supervisor_ids_are_unique_unless_named() -> None:
    assert supervisor_id("web-1") == "web-1"
    assert supervisor_id() != supervisor_id()


# --- against Redis ----------------------------------------------------------------------


@pytest.fixture
def aclient(settings_for: Settings) -> Iterator[aredis.Redis]:
    """An asyncio client of the session's Redis (closed by the test's own loop)."""
    yield aredis.Redis.from_url(settings_for.redis_url)


def _lease(client: aredis.Redis, settings: Settings, owner: str, shard: int = 0,
           ttl: float = 2.0) -> ShardLease:
    return ShardLease(client, Keys(settings.key_prefix), shard, owner, LeaseTiming(ttl, ttl / 4))


def test_one_owner_at_a_time_and_the_token_only_grows(settings_for: Settings,
                                                      aclient: aredis.Redis) -> None:
    async def go() -> None:
        stop = asyncio.Event()
        a, b = _lease(aclient, settings_for, "A"), _lease(aclient, settings_for, "B")
        assert await a.acquire(stop)
        waiting = asyncio.create_task(b.acquire(stop))
        await asyncio.sleep(0.5)
        assert not waiting.done(), "B took a lease A holds"
        await a._renew_once()
        assert a.valid()
        released = time.monotonic()
        await a.release()
        assert await asyncio.wait_for(waiting, 2)
        assert time.monotonic() - released < 0.5  # the next owner starts at once
        assert b.token > a.token
        await a._renew_once()  # A finds it gone: stops for good
        assert a.lost_reason.startswith("taken over") and not a.valid()
        # The same owner again (a restarted worker of B's supervisor): a new token, which
        # fences the old worker's acks.
        b2 = _lease(aclient, settings_for, "B")
        assert await b2.acquire(stop)
        assert b2.token > b.token
        await b._renew_once()
        assert not b.valid() and b2.valid()
        await aclient.aclose()
    asyncio.run(go())


def test_the_holder_stops_before_redis_lets_its_lease_go(settings_for: Settings,
                                                         aclient: aredis.Redis,
                                                         redis_client: redis.Redis) -> None:
    """A holder that cannot renew (here: it simply does not) is invalid by its own clock while
    Redis still keeps its lease: nobody else can hold the shard while it might still act."""
    keys = Keys(settings_for.key_prefix)

    async def go() -> None:
        a = _lease(aclient, settings_for, "A", ttl=1.0)
        assert await a.acquire(asyncio.Event())
        while a.valid():
            await asyncio.sleep(0.005)
        remaining_ms = redis_client.pttl(keys.lease(0))
        assert remaining_ms > 0, "the lease expired in Redis before its holder stopped"
        assert remaining_ms >= 1000 * a.timing.margin_s - 150
        other = _lease(aclient, settings_for, "B", ttl=1.0)
        assert not await asyncio.wait_for(_try_once(other), 1)
        await aclient.aclose()
    asyncio.run(go())


async def _try_once(lease: ShardLease) -> bool:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    return await lease.acquire(stop)


def test_acks_are_fenced_by_the_lease(settings_for: Settings, aclient: aredis.Redis,
                                      redis_client: redis.Redis) -> None:
    """The old owner's XACK after a takeover is refused atomically; the entry stays pending
    for the new owner, who acks it."""
    keys = Keys(settings_for.key_prefix)
    stream = keys.stream(0)
    settings = settings_for.replace(shards=1)
    produce(settings, ["/lease/ack"], 3)

    async def go() -> None:
        await streams.ensure_group(aclient, stream)
        old = _lease(aclient, settings_for, "A")
        assert await old.acquire(asyncio.Event())
        got = cast(RawRead, await aclient.xreadgroup(CONSUMER_GROUP, "shard-0", {stream: ">"},
                                                     count=10))
        ids = [sid for sid, _ in got[0][1]]
        assert len(ids) == 3
        assert await _fenced_ack(aclient, keys, old.fence, ids[:1]) == 1  # under the lease
        await old.release()
        new = _lease(aclient, settings_for, "B")
        assert await new.acquire(asyncio.Event())
        assert await _fenced_ack(aclient, keys, old.fence, ids[1:]) == FENCED
        assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 2
        assert await _fenced_ack(aclient, keys, new.fence, ids[1:]) == 2
        await aclient.aclose()
    asyncio.run(go())
    assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    meta = redis_client.hgetall(keys.meta(0))
    assert meta[b"done"] == meta[b"appended"] == b"3"  # the counters count only real acks


async def _fenced_ack(client: aredis.Redis, keys: Keys, fence: str, ids: list[bytes]) -> int:
    stream = keys.stream(0)
    return int(await client.eval(FENCED_ACK_LUA, 3, stream, keys.meta(0), keys.lease(0),
                                 CONSUMER_GROUP, fence, *ids))


def test_membership_expires_and_status_shows_owners_and_supervisors(
        settings_for: Settings, redis_client: redis.Redis, aclient: aredis.Redis) -> None:
    keys = Keys(settings_for.key_prefix)
    a = Registry(redis_client, keys, "sup-a", ttl_s=0.5)
    b = Registry(redis_client, keys, "sup-b", ttl_s=5.0)
    assert a.beat({"host": "h1", "pid": 1, "shards": [0, 1], "started": time.time()}) == ["sup-a"]
    assert sorted(b.beat({"host": "h2", "pid": 2, "shards": [2, 3]})) == ["sup-a", "sup-b"]

    async def take() -> int:
        lease = _lease(aclient, settings_for, "sup-b", shard=2, ttl=5.0)
        assert await lease.acquire(asyncio.Event())
        await aclient.aclose()
        return lease.token
    token = asyncio.run(take())
    supervisors = collect_supervisors(settings_for, redis_client)
    assert [(s.name, s.shards) for s in supervisors] == [("sup-a", [0, 1]), ("sup-b", [2, 3])]
    assert "supervisor sup-b: 2@h2, shards [2, 3]" in supervisor_lines(supervisors)
    shards = collect(settings_for, redis_client)
    assert (shards[2].owner, shards[2].token) == ("sup-b", token)
    assert shards[2].lease_age_s is not None and 0 <= shards[2].lease_age_s < 5
    assert shards[0].owner is None
    assert f"sup-b ({token}," in table(shards) and "no owner" in table(shards)
    time.sleep(0.6)  # sup-a stopped beating: gone at the next beat of anyone
    assert b.beat({}) == ["sup-b"]
    assert [s.name for s in collect_supervisors(settings_for, redis_client)] == ["sup-b"]
    b.leave()
    assert collect_supervisors(settings_for, redis_client) == []
    assert parse_fence(f"{token}:sup-b:x") == (token, "sup-b:x")


def test_reads_are_fenced_by_the_lease(settings_for: Settings, aclient: aredis.Redis,
                                       redis_client: redis.Redis) -> None:
    """An old owner's group read after a takeover takes nothing (it would leave entries
    pending where the new owner, past its XAUTOCLAIM, never looks); the new owner's read gets
    them; with nothing new, the read waits for the next entry."""
    keys = Keys(settings_for.key_prefix)
    stream = keys.stream(0)
    settings = settings_for.replace(shards=1)
    produce(settings, ["/lease/read"], 3)

    async def go() -> None:
        await streams.ensure_group(aclient, stream)
        old = _lease(aclient, settings_for, "A")
        assert await old.acquire(asyncio.Event())
        [(_, first)] = await old.read_new(aclient, [stream], "shard-0", 1, 100)
        assert len(first) == 1
        await old.release()
        new = _lease(aclient, settings_for, "B")
        assert await new.acquire(asyncio.Event())
        assert await old.read_new(aclient, [stream], "shard-0", 10, 100) == []
        assert old.lost_reason.startswith("taken over")
        assert redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 1
        [(_, rest)] = await new.read_new(aclient, [stream], "shard-0", 10, 100)
        assert len(rest) == 2
        assert await new.read_new(aclient, [stream], "shard-0", 10, 300) == []  # nothing new
        started = time.monotonic()
        assert await new.read_new(aclient, [stream], "shard-0", 10, 300) == []
        assert time.monotonic() - started >= 0.25  # then it waits for a new entry
        waiting = asyncio.create_task(new.read_new(aclient, [stream], "shard-0", 10, 5000))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(produce, settings, ["/lease/read"], 1)
        [(_, last)] = await asyncio.wait_for(waiting, 2)  # woken by the entry, and takes it
        assert len(last) == 1
        await aclient.aclose()
    asyncio.run(go())
