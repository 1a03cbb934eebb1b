"""Shard leases: at most one owner per shard, with a fencing token that only grows.

A shard's lease is the hash ``{prefix}:{N}:lease`` (fields ``fence`` = ``"<token>:<owner>"``
and ``since``, the Redis time in ms it was taken) with a TTL; ``{prefix}:{N}:fence`` is the
counter every acquisition increments. Both carry the shard's hash tag, so each script below
touches one Redis Cluster slot, as does the fenced ack (scalepub/shard/acks.py).

The holder's own clock decides when it must stop: a renewal sent at monotonic time ``t``
and answered keeps the lease in Redis until at least ``t + ttl``; the holder stops
publishing at ``t + ttl - margin`` (``LeaseTiming``), before anyone else can take it.
docs/reliability.md, "Shard leases and fencing", gives the whole argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis
import redis.asyncio as aredis

from scalepub.connections import Commands, Lua, OwnConnection, script_missing
from scalepub.sharding import CONSUMER_GROUP, Keys

log = logging.getLogger(__name__)

# How often a worker waiting for a shard asks for it: the next owner starts within this
# much of a graceful release (a few cheap commands per second, only while waiting).
ACQUIRE_POLL_S = 0.1

# KEYS: lease, fence counter. ARGV: owner, ttl ms. Takes the lease if nobody holds it, or if
# the holder is the same owner: owners are process slots of one supervisor run
# (``<id>#<run>/<slot>``, pool.py), and a slot's next worker starts only after the last one
# ended (its process exited, or its worker returned). The new token fences the predecessor.
# Returns the new token, or 0 and the holder's fence.
ACQUIRE_LUA = """
local held = redis.call('HGET', KEYS[1], 'fence')
if held then
  local owner = string.match(held, '^%d+:(.*)$')
  if owner ~= ARGV[1] then return {0, held} end
end
local token = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fence', token .. ':' .. ARGV[1],
           'since', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {token, ''}
"""

# KEYS: lease. ARGV: fence, ttl ms. 1 if still ours (TTL reset), else 0.
RENEW_LUA = """
if redis.call('HGET', KEYS[1], 'fence') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: fence. Deletes the lease only if it is still ours.
RELEASE_LUA = """
if redis.call('HGET', KEYS[1], 'fence') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Lua prelude for scripts that may only act under a valid lease: KEYS[lease_key] holds the
# fence given in ARGV[fence_arg]. Used by the fenced ack and dead-letter scripts.
FENCE_CHECK_LUA = """
local function holds(lease_key, fence)
  return redis.call('HGET', lease_key, 'fence') == fence
end
"""

# KEYS: stream, lease. ARGV: group, consumer, count, fence. New entries for the consumer only
# while the lease holds: a reader that stalled between its own check and this read takes
# nothing away from the next owner. Returns -1 (fenced), the XREADGROUP reply, or, when
# nothing is new, the stream's last id (to wait for a newer one with a plain XREAD BLOCK,
# which scripts cannot do). Sent by its SHA1 (``FENCED_READ``, ShardLease.read_new).
FENCED_READ_LUA = FENCE_CHECK_LUA + """
if not holds(KEYS[2], ARGV[4]) then return -1 end
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[1], '>')
if got then return got end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then return last[1][1] end
return '0-0'
"""
FENCED_READ = Lua(FENCED_READ_LUA)
# The longest wait a round's acks may go after (``_acks_after_wait``): the reader's block.
ACKS_AFTER_WAIT_MAX_MS = 100
# A quiet shard's waits between two fenced reads (each up to the reader's quiet block,
# 500 ms: the script runs at least once a second).
IDLE_WAITS = 2


class Carried(Protocol):
    """Commands sent in front of a read, in its round trip (the worker's acks: acks.Ride)."""

    def queue(self, pipe: Any, *, by_sha: bool) -> int:
        """Add them to ``pipe``; how many commands were added."""

    def answered(self, replies: list[object]) -> None:
        """Their replies, in order."""

    def failed(self) -> None:
        """The round trip failed: they may not have run."""


@dataclass(frozen=True)
class LeaseTiming:
    """When a holder renews, and until when it may act on a renewal (pure, unit-tested)."""

    ttl_s: float
    renew_s: float

    @property
    def margin_s(self) -> float:
        """Stop this long before Redis could let the lease go: the time between a local
        check and its bytes being handled by the server, and clock-rate drift."""
        return max(0.2 * self.ttl_s, 0.1)

    def valid_until(self, sent_at: float) -> float:
        """Monotonic deadline given by a renewal (or acquisition) *sent* at ``sent_at``."""
        return sent_at + self.ttl_s - self.margin_s

    def call_timeout(self, now: float, deadline: float) -> float:
        """How long a renewal may wait for Redis: never past the deadline, at least 50 ms."""
        return max(min(deadline - now, self.renew_s), 0.05)

    def ttl_ms(self) -> int:
        """The TTL as Redis takes it."""
        return max(int(self.ttl_s * 1000), 1)


def fence_of(token: int, owner: str) -> str:
    """The value a lease holds for ``owner`` under ``token``."""
    return f"{token}:{owner}"


def parse_fence(fence: str) -> tuple[int, str]:
    """``(token, owner)`` of a lease's fence value."""
    token, _, owner = fence.partition(":")
    return int(token), owner


class ShardLease:
    """One shard's lease, as one worker holds it: acquire, keep, check, release."""

    def __init__(self, client: aredis.Redis, keys: Keys, shard: int, owner: str,
                 timing: LeaseTiming, on_renew_failure: Callable[[], None] | None = None,
                 on_acquired: Callable[[], None] | None = None) -> None:
        self.redis = client
        self.key = keys.lease(shard)
        self.fence_key = keys.fence(shard)
        self.shard = shard
        self.owner = owner
        self.timing = timing
        self.token = 0
        self.deadline = 0.0  # monotonic; nothing may be sent or acked after it
        self.lost_reason = ""
        self._on_renew_failure = on_renew_failure
        self._on_acquired = on_acquired
        # The newest id of the stream known to be taken, when the last read took all that
        # was new: the next read first waits for a newer one.
        self._idle_after: bytes | None = None
        self._quiet = 0  # waits in a row that found nothing new (0: entries came lately)
        # The reads' round trips go over a connection of their own (one reader per lease).
        self._own: tuple[aredis.Redis, OwnConnection | None] | None = None

    @property
    def fence(self) -> str:
        """The value the fenced scripts compare with the lease."""
        return fence_of(self.token, self.owner)

    def valid(self) -> bool:
        """Whether this holder may still publish and acknowledge (its own clock)."""
        return not self.lost_reason and time.monotonic() < self.deadline

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Wait until the lease is ours (True) or ``stop`` is set (False)."""
        holder = ""
        while not stop.is_set():
            sent = time.monotonic()
            try:
                token, held = await self.redis.eval(
                    ACQUIRE_LUA, 2, self.key, self.fence_key, self.owner, self.timing.ttl_ms())
            except redis.RedisError as exc:
                log.warning("shard %d: cannot ask for its lease (%s); retrying", self.shard, exc)
                await _wait(stop, 0.5)
                continue
            if int(token):
                self.token, self.deadline, self.lost_reason = int(token), \
                    self.timing.valid_until(sent), ""
                log.info("shard %d: lease taken by %s, token %d", self.shard, self.owner,
                         self.token)
                if self._on_acquired is not None:
                    self._on_acquired()
                return True
            if held != holder:
                holder = held.decode() if isinstance(held, bytes) else str(held)
                log.info("shard %d: waiting for its lease, held by %s", self.shard, holder)
            await _wait(stop, ACQUIRE_POLL_S)
        return False

    async def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew every ``renew_s`` until cancelled; ``on_lost`` once if it is lost or expires."""
        while not self.lost_reason:
            await asyncio.sleep(max(min(self.timing.renew_s, self.deadline - time.monotonic()),
                                    0.0))
            if self.lost_reason:
                return
            await self._renew_once()
            if self.lost_reason:
                on_lost(self.lost_reason)

    async def _renew_once(self) -> None:
        sent = time.monotonic()
        try:
            ours = await asyncio.wait_for(
                self.redis.eval(RENEW_LUA, 1, self.key, self.fence, self.timing.ttl_ms()),
                self.timing.call_timeout(sent, self.deadline))
        except (redis.RedisError, TimeoutError) as exc:
            if self._on_renew_failure is not None:
                self._on_renew_failure()
            if time.monotonic() >= self.deadline:
                self.lost_reason = f"expired: could not renew it ({exc or 'timeout'})"
            else:
                log.warning("shard %d: lease renewal failed (%s); %.1f s left", self.shard,
                            exc or "timeout", self.deadline - time.monotonic())
            return
        if not int(ours):
            self.lost_reason = "taken over: the lease is no longer ours"
            if self._on_renew_failure is not None:
                self._on_renew_failure()
        elif not self.lost_reason:
            self.deadline = self.timing.valid_until(sent)

    async def read_new(self, r: aredis.Redis, keys: Sequence[str], consumer: str, count: int,
                       block_ms: int, carried: Carried | None = None, *,
                       quiet_block_ms: int | None = None) -> list[tuple[bytes, Any]]:
        """New entries of the shard's stream for ``consumer`` (XREADGROUP ``>``) while the lease
        holds: the group read is fenced in Redis.

        After a read that took entries, one round trip (a pipeline): a plain XREAD BLOCK
        from the newest id taken (it takes nothing; scripts cannot block), ``carried`` (the
        acks of what the server confirmed), then the fenced read, which Redis runs as soon
        as the wait ends: at one entry per wake-up one write and one reply instead of a
        wait, a read, an empty read and an ack (``_acks_after_wait``). Once a wait found
        nothing, the shard is quiet: it waits alone (an idle shard's cost as before leases)
        and reads when woken, and runs the script at least every ``IDLE_WAITS`` waits anyway.
        A quiet shard's waits last up to ``quiet_block_ms`` (default ``block_ms``): an entry
        ends a wait at once whatever its length, so a longer one costs no latency, only
        wake-ups of an idle shard.
        """
        [key] = keys
        try:
            block = block_ms if not self._quiet else (quiet_block_ms or block_ms)
            reply = await self._take(r, key, (CONSUMER_GROUP, consumer, count, self.fence),
                                     block, carried)
        except BaseException:
            if carried is not None:
                carried.failed()  # they are sent again (an ack twice counts once)
            raise
        if reply is None:  # a quiet wait ended with nothing new
            return []
        if reply == -1:
            self.lost_reason = self.lost_reason or "taken over: the lease is no longer ours"
            return []
        if not isinstance(reply, list):
            self._idle_after, self._quiet = cast(bytes, reply), 1  # the stream's last id
            return []
        got = [(stream, entries) for stream, entries in reply]
        taken = [entry for _, entries in got for entry in entries]
        # Fewer than asked: everything new was taken, wait for a newer entry next time.
        self._idle_after = taken[-1][0] if taken and len(taken) < count else None
        self._quiet = 0
        return got

    async def _take(self, r: aredis.Redis, key: str, args: tuple[Any, ...], block_ms: int,
                    carried: Carried | None) -> object:
        """The fenced read's reply, or None when a quiet shard's wait ended empty."""
        wait = (self._idle_after, block_ms) if self._idle_after is not None else None
        if wait is not None and 0 < self._quiet < IDLE_WAITS:
            # The script again at least every IDLE_WAITS waits: a stream recreated with lower
            # ids (Redis restarted without its data) would not end the wait.
            woke, _ = await self._round(r, key, carried, None, wait)
            if not woke:
                self._quiet += 1
                return None
            carried, wait = None, None  # the acks went with the wait; read at once
        return (await self._round(r, key, carried, args, wait))[1]

    async def _round(self, r: aredis.Redis, key: str, carried: Carried | None,
                     args: tuple[Any, ...] | None, wait: tuple[bytes, int] | None
                     ) -> tuple[object, object]:
        """One pipeline of ``read_new`` (each part if given); the wait's and the read's
        replies (None for a part not sent).

        What Redis refused for lack of its script (restarted, failed over, flushed) is sent
        again with the script's body, and only that: a read that ran took entries, which a
        second read would leave pending and unseen.
        """
        n, replies = await self._send(r, key, carried, args, wait, by_sha=True)
        if _acks_after_wait(wait, args):
            woke, acked = replies[0], replies[1:1 + n]
        else:
            acked, woke = replies[:n], replies[n] if wait is not None else None
        read = replies[-1] if args is not None else None
        acks_again = any(script_missing(x) for x in acked)
        if acks_again or script_missing(read):
            log.info("shard %d: Redis lacked the fenced scripts (restarted, failed over or "
                     "flushed); sending their bodies", self.shard)
            m, again = await self._send(r, key, carried if acks_again else None,
                                        args if script_missing(read) else None, None,
                                        by_sha=False)
            acked = again[:m] if acks_again else acked
            read = again[-1] if script_missing(read) else read
        for answer in (*acked, woke, read):
            if isinstance(answer, Exception):
                raise answer  # e.g. NOGROUP: the Retrier re-creates the group
        if carried is not None:
            carried.answered(acked)
        return woke, read

    async def _send(self, r: aredis.Redis, key: str, carried: Carried | None,
                    read_args: tuple[Any, ...] | None, wait: tuple[bytes, int] | None, *,
                    by_sha: bool) -> tuple[int, list[object]]:
        """One pipeline: the carried commands, the wait (for an id after ``wait[0]``, up to
        ``wait[1]`` ms), the fenced read (each if given; the carried ones after the wait when
        a read follows it, ``_acks_after_wait``); how many carried commands, and every
        reply."""
        own = self._own_connection(r)
        if own is None:  # a cluster client: its pipeline goes to the slot's master
            async with r.pipeline(transaction=False) as pipe:
                n = self._queue(pipe, key, carried, read_args, wait, by_sha)
                return n, list(await pipe.execute(raise_on_error=False))
        commands = Commands()
        n = self._queue(commands, key, carried, read_args, wait, by_sha)
        return n, await own.execute(commands.stack, wait[1] / 1000 if wait else 0.0)

    def _queue(self, pipe: Any, key: str, carried: Carried | None,
               read_args: tuple[Any, ...] | None, wait: tuple[bytes, int] | None,
               by_sha: bool) -> int:
        """Add ``_send``'s commands to ``pipe``; how many carried commands."""
        after = _acks_after_wait(wait, read_args)
        n = carried.queue(pipe, by_sha=by_sha) if carried is not None and not after else 0
        if wait is not None and isinstance(pipe, Commands):
            pipe.execute_command("XREAD", "COUNT", 1, "BLOCK", wait[1], "STREAMS", key,
                                 wait[0])
        elif wait is not None:
            pipe.xread({key: wait[0]}, count=1, block=wait[1])
        if carried is not None and after:
            n = carried.queue(pipe, by_sha=by_sha)
        if read_args is not None:
            FENCED_READ.queue(pipe, [key, self.key], read_args, by_sha=by_sha)
        return n

    def _own_connection(self, r: aredis.Redis) -> OwnConnection | None:
        """The reads' own connection to ``r``'s server (None for a cluster client)."""
        if self._own is None or self._own[0] is not r:
            self._own = (r, OwnConnection.of(r))
        return self._own[1]

    async def close(self) -> None:
        """Close the reads' own connection."""
        own, self._own = self._own, None
        if own is not None and own[1] is not None:
            await own[1].aclose()

    async def release(self) -> None:
        """Let the next owner take the shard at once (only if the lease is still ours)."""
        if not self.token:
            return
        try:
            await self.redis.eval(RELEASE_LUA, 1, self.key, self.fence)
        except redis.RedisError as exc:  # it expires by itself within the TTL
            log.warning("shard %d: could not release its lease (%s)", self.shard, exc)
        self.deadline = 0.0


def _acks_after_wait(wait: tuple[bytes, int] | None, read_args: tuple[Any, ...] | None
                     ) -> bool:
    """Whether a round's carried acks go after its wait: when a read follows the wait (a busy
    shard's round, the wait at most the reader's short block), so every reply comes back
    at once when the wait ends: one wake-up of the shard per round trip instead of two (the
    acks' replies came back at once, the wait's later). They run when the wait ends, still
    fenced; a longer wait (a quiet shard's) keeps its acks in front."""
    return wait is not None and read_args is not None and wait[1] <= ACKS_AFTER_WAIT_MAX_MS


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
