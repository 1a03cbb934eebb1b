"""Live supervisors and how the shards are spread over them.

Every supervisor refreshes its entry in one sorted set (score: the Redis time its entry
expires, so hosts' clocks do not matter) and reads the live ids back in the same script.
All supervisors then compute the same spread from the same ids (``spread``, a pure
function): each tries to own its share. Leases (scalepub/shard/lease.py) keep two from
owning a shard at once while their views of the membership briefly differ.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import secrets
import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, cast

import redis
import redis.asyncio as aredis

from scalepub.sharding import Keys

log = logging.getLogger(__name__)

# KEYS: members (sorted set), info (hash). ARGV: id, ttl ms, info JSON. Refreshes the entry,
# drops expired ones, returns the Redis time (ms) and the live ids with their expiry times.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
"""

# KEYS: members, info. ARGV: id. A supervisor that stops leaves at once.
LEAVE_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
"""


# KEYS: members, info. ARGV: id, host, pid. Removes the entry only if it is still the one of
# that process (a supervisor restarted under the same --name keeps its new entry).
LEAVE_DEAD_LUA = """
local raw = redis.call('HGET', KEYS[2], ARGV[1])
if not raw then return 0 end
local info = cjson.decode(raw)
if info['host'] ~= ARGV[2] or tostring(info['pid']) ~= ARGV[3] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
"""


async def leave_for_dead(client: aredis.Redis, keys: Keys, me: str, pid: int) -> bool:
    """Remove the entry of supervisor ``me`` (process ``pid`` on this host), which its shard
    processes saw die: the others take its shards now rather than when the entry expires."""
    gone = await client.eval(LEAVE_DEAD_LUA, 2, keys.supervisors, keys.supervisor_info, me,
                             socket.gethostname(), str(pid))
    return bool(gone)


def supervisor_id(name: str | None = None) -> str:
    """``--name`` if given, else hostname-pid-random: unique even for two pools on one host."""
    if name:
        return name
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def spread(shards: int, members: Sequence[str]) -> dict[str, list[int]]:
    """Each member's shards: counts differ by at most one, the same result everywhere.

    The members with the extra shard are the first by name; each shard goes to the member
    that ranks it highest (rendezvous hashing) among those with room left, so a join or a
    leave moves fewer shards than a round robin would.
    """
    ids = sorted(set(members))
    if not ids:
        return {}
    base, extra = divmod(shards, len(ids))
    room = {m: base + (1 if i < extra else 0) for i, m in enumerate(ids)}
    out: dict[str, list[int]] = {m: [] for m in ids}
    for shard in range(shards):
        ranked = sorted(ids, key=lambda m, s=shard: (-_score(m, s), m))  # type: ignore[misc]
        owner = next(m for m in ranked if room[m] > 0)
        room[owner] -= 1
        out[owner].append(shard)
    return out


def _score(member: str, shard: int) -> int:
    return zlib.crc32(f"{member}/{shard}".encode())


class Registry:
    """This supervisor's entry in the registry of live supervisors."""

    def __init__(self, client: redis.Redis, keys: Keys, me: str, ttl_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.me = me
        self.ttl_ms = max(int(ttl_s * 1000), 1)

    def beat(self, info: dict[str, Any]) -> list[str]:
        """Refresh our entry (with ``info``) and return the live supervisors' ids."""
        return sorted(self.beat_timed(info)[0])

    def beat_timed(self, info: dict[str, Any]) -> tuple[list[str], float | None]:
        """``beat``, plus the seconds until another supervisor's entry expires (None: no
        other one): beating again right then notices a dead one without waiting a period."""
        now, flat = cast(list[Any], self.redis.eval(
            HEARTBEAT_LUA, 2, self.keys.supervisors, self.keys.supervisor_info, self.me,
            self.ttl_ms, json.dumps(info, sort_keys=True)))
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m in flat[0::2]]
        others = [float(score) for m, score in zip(ids, flat[1::2], strict=True) if m != self.me]
        return ids, (min(others) - int(now)) / 1000 if others else None

    def leave(self) -> None:
        """Remove our entry: the others take our shards at their next beat."""
        self.redis.eval(LEAVE_LUA, 2, self.keys.supervisors, self.keys.supervisor_info, self.me)


class Beater(threading.Thread):
    """Beats for the supervisor in a thread of its own and sends each new list of live ids
    down a pipe: a supervisor busy starting processes on a loaded box must not miss beats
    and drop out of the membership (seen at load average 17 with beats in its main loop)."""

    def __init__(self, registry: Registry, renew_s: float,
                 info: Callable[[], dict[str, Any]]) -> None:
        super().__init__(name="membership", daemon=True)
        self.registry = registry
        self.renew_s = renew_s
        self.info = info
        self.changes, self._send = multiprocessing.Pipe(duplex=False)
        self._halt = threading.Event()  # not _stop: Thread has a method of that name
        self._last: list[str] | None = None

    def run(self) -> None:
        """Beat every ``renew_s``, and when another supervisor's entry expires."""
        next_at = 0.0
        while not self._halt.wait(max(next_at - time.monotonic(), 0.0)):
            now = time.monotonic()
            next_at = now + self.renew_s
            try:
                live, expiry = self.registry.beat_timed(self.info())
            except redis.RedisError as exc:  # the workers' leases decide meanwhile
                log.warning("cannot refresh the membership of %s: %s", self.registry.me, exc)
                continue
            if expiry is not None:  # a dead supervisor is noticed when its entry expires
                next_at = min(next_at, now + max(expiry + 0.01, 0.05))
            if live != self._last:
                self._last = live
                self._send.send(live)

    def latest(self) -> list[str] | None:
        """The newest list of live ids sent since the last call (None: no change)."""
        live = None
        while self.changes.poll():
            live = self.changes.recv()
        return live

    def stop(self) -> None:
        """Stop beating (then ``registry.leave()`` takes our entry out)."""
        self._halt.set()
        self.join(5)
