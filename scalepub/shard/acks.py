"""Acknowledging what the server confirmed, and moving entries to the dead-letter stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis
import redis.asyncio as aredis

from scalepub.backlog import meta_of
from scalepub.connections import Lua
from scalepub.shard import streams
from scalepub.shard.heartbeat import Health, Retrying
from scalepub.shard.lease import FENCE_CHECK_LUA, ShardLease
from scalepub.shard.stats import Meters, Stats
from scalepub.sharding import CONSUMER_GROUP, ENTRY_FIELD, Keys

log = logging.getLogger(__name__)

_ACK_RETRY_S = 0.5
FENCED = -1  # what the fenced scripts return when the lease is not (or no longer) ours

# The ack under the shard's lease. KEYS: stream, meta, lease. ARGV: group, fence, then ids.
# The check and the XACK are one script: no other owner can come in between (docs/
# reliability.md, fencing). All three keys carry the shard's hash tag: one cluster slot.
FENCED_ACK_LUA = streams.ACK_FUNCTION_LUA + FENCE_CHECK_LUA + """
if not holds(KEYS[3], ARGV[2]) then return -1 end
return ack(KEYS[1], KEYS[2], ARGV[1], 3)
"""
FENCED_ACK = Lua(FENCED_ACK_LUA)

# One entry to the dead-letter stream with its ack, under the lease. KEYS: stream, meta, lease,
# dead-letter stream. ARGV: group, fence, stream id, envelope, reason, at_ns, maxlen.
FENCED_DEAD_LETTER_LUA = FENCE_CHECK_LUA + """
if not holds(KEYS[3], ARGV[2]) then return -1 end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'e', ARGV[4], 'reason', ARGV[5],
           'stream_id', ARGV[3], 'at_ns', ARGV[6])
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
if n > 0 then redis.call('HINCRBY', KEYS[2], 'done', n) end
return n
"""
assert ENTRY_FIELD == b"e", "FENCED_DEAD_LETTER_LUA's entry field"

Spawn = Callable[[Awaitable[None]], None]


def queue_acks(pipe: Any, keys: Keys, shard: int, fence: str, ids: Sequence[bytes], *,
               by_sha: bool = False) -> int:
    """Add fenced acks of ``ids`` (entries the server confirmed) to a pipeline; each reply is
    the count acknowledged, or ``FENCED``. Returns how many commands were added.

    By default the script's body (EVAL): a flush of its own is rare (acks ride on reads,
    ``Ride``) and then needs no NOSCRIPT recovery; ``by_sha`` where the caller has one.
    """
    key = keys.stream(shard)
    starts = range(0, len(ids), streams.ACK_CHUNK)
    for start in starts:
        FENCED_ACK.queue(pipe, [key, meta_of(key), keys.lease(shard)],
                         [CONSUMER_GROUP, fence, *ids[start:start + streams.ACK_CHUNK]],
                         by_sha=by_sha)
    return len(starts)


async def dead_letter(client: aredis.Redis, keys: Keys, shard: int, fence: str, *,
                      stream_id: bytes, envelope: bytes, reason: str) -> int:
    """Move one entry to the shard's dead-letter stream with its ack; ``FENCED`` if the lease
    is not ``fence``'s, else the count acknowledged."""
    key = keys.stream(shard)
    return int(await client.eval(
        FENCED_DEAD_LETTER_LUA, 4, key, meta_of(key), keys.lease(shard), keys.dead(shard),
        CONSUMER_GROUP, fence, stream_id, envelope, reason.encode("utf-8", "replace"),
        str(time.time_ns()), streams.DEAD_LETTER_MAXLEN))


class Acks:
    """XACKs gathered while replies arrive and sent in one pipeline; dead letters."""

    def __init__(self, name: str, client: aredis.Redis, keys: Keys, stats: Stats,
                 meters: Meters, health: Health, retrying: Retrying, spawn: Spawn,
                 lease: ShardLease, *, ride_s: float = 0.0) -> None:
        self.name = name
        # How long gathered acks wait for the reader's next read to carry them (Ride) before
        # the loop sends them itself; 0: at once. Longer than the reader's blocking wait, so
        # while it reads they always ride; when it stops reading they go within 2 * ride_s.
        self.ride_s = ride_s
        self.lease = lease  # every ack and dead letter is fenced by it
        self.retrying = retrying
        self.spawn = spawn
        self.redis = client
        self.keys = keys
        self.stats = stats
        self.meters = meters
        self.health = health
        self._ids: dict[int, list[bytes]] = defaultdict(list)
        self._wakeup = asyncio.Event()
        self._rides = 0  # reads that took the gathered ids (Ride), none or some
        self._failing = False

    def add(self, shard: int, ids: Iterable[bytes]) -> None:
        """Acknowledge ``ids`` of ``shard`` with the next flush."""
        self._ids[shard].extend(ids)
        self._wakeup.set()

    async def loop(self) -> None:
        """Flush what there is to acknowledge, until cancelled; with ``ride_s``, only what
        no read carried: the reader's reads take the acks while it reads (at most ``ride_s``
        apart); when it stops (waits for buffer space, claims, drains) the loop sends them."""
        # A cancellation that arrives while redis-py's pipeline finishes can be swallowed in
        # it (seen: the loop then waited for ever and held a graceful stop up for 3 s); the
        # task still counts the request (Task.cancelling), so the loop ends anyway.
        while not _cancelling():
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.ride_s:
                rides = self._rides
                await asyncio.sleep(self.ride_s)
                if self._rides != rides and self._ids:
                    self._wakeup.set()  # the reader reads: its next read carries these
                    continue
            await self.flush()

    def ride(self, shard: int) -> Ride:
        """The acks of ``shard`` gathered so far, to send in front of the reader's next read."""
        return Ride(self, shard)

    def take(self, shard: int) -> list[bytes]:
        """Remove and return the gathered ids of ``shard`` (a Ride sends them)."""
        self._rides += 1
        return self._ids.pop(shard, [])

    def give_back(self, shard: int, ids: list[bytes]) -> None:
        """Ids a Ride could not send: with the next flush or ride."""
        if ids:
            self._ids[shard][:0] = ids
            self._wakeup.set()

    async def flush(self) -> None:
        """Send the gathered XACKs; on a Redis error keep them for the next flush."""
        ids, self._ids = self._ids, defaultdict(list)
        if not ids:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, shard_ids in ids.items():
                    queue_acks(pipe, self.keys, shard, self.lease.fence, shard_ids)
                replies = await pipe.execute()
        except redis.RedisError as exc:
            # Unacked entries are re-published after a restart: duplicates, never losses.
            log.warning("shard %s: XACK failed (%s); will retry", self.name, exc)
            self._set_failing(True)
            for shard, shard_ids in ids.items():
                self._ids[shard][:0] = shard_ids
            await asyncio.sleep(_ACK_RETRY_S)
            self._wakeup.set()
            return
        self._set_failing(False)
        self.count_fenced(replies, sum(len(v) for v in ids.values()))

    def count_fenced(self, replies: list[object], count: int) -> None:
        """Acks refused by the fence are dropped: the shard's new owner re-publishes them."""
        if any(r == FENCED for r in replies):
            log.warning("shard %s: %d acks refused: the lease is no longer ours (%s); the next "
                        "owner re-publishes those entries", self.name, count,
                        self.lease.lost_reason or "taken over")

    def _set_failing(self, failing: bool) -> None:
        if failing != self._failing:
            self._failing = failing
            self.health.redis_failing += 1 if failing else -1

    def dead_letter(self, shard: int, sid: bytes, raw: bytes, reason: str) -> None:
        """Move one entry to the dead-letter stream (acknowledging it), in the background."""
        self.stats.dead_lettered += 1
        self.meters.dead_letter(shard)
        log.error("shard %d: entry %s dead-lettered: %s", shard, sid.decode(), reason)
        self.spawn(self.retrying(lambda: self._dead_letter(shard, sid, raw, reason)))

    async def _dead_letter(self, shard: int, sid: bytes, raw: bytes, reason: str) -> None:
        done = await dead_letter(self.redis, self.keys, shard, self.lease.fence, stream_id=sid,
                                 envelope=raw, reason=reason)
        if done == FENCED:
            log.warning("shard %d: entry %s not dead-lettered: the lease is no longer ours",
                        shard, sid.decode())


class Ride:
    """Acks sent in the reader's read round trip (lease.Carried): one write and one reply
    for both at one entry per wake-up. Fenced as every ack: an old owner's are refused."""

    def __init__(self, acks: Acks, shard: int) -> None:
        self.acks = acks
        self.shard = shard
        self.ids: list[bytes] | None = None  # taken at the first queue, kept for a resend

    def queue(self, pipe: Any, *, by_sha: bool) -> int:
        """Add the fenced acks of the ids gathered until now; how many commands."""
        if self.ids is None:
            self.ids = self.acks.take(self.shard)
        return queue_acks(pipe, self.acks.keys, self.shard, self.acks.lease.fence, self.ids,
                          by_sha=by_sha)

    def answered(self, replies: list[object]) -> None:
        """Log refused acks, as a flush does."""
        if self.ids:
            self.acks.count_fenced(replies, len(self.ids))
        self.ids = None

    def failed(self) -> None:
        """The round trip failed: the ids go back to the Acks."""
        self.acks.give_back(self.shard, self.ids or [])
        self.ids = None


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
