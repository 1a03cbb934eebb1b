"""Live supervisors and how the shards are spread over them.

Every supervisor refreshes its entry in one sorted set (score: the Redis time its entry
expires, so hosts' clocks do not matter) and reads the live ids back in the same script.
All supervisors then compute the same spread from the same ids (``spread``, a pure
function): each tries to own its share. Leases (scalepub/shard/lease.py) keep two from
owning a shard at once while their views of the membership briefly differ.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import zlib
from collections.abc import Sequence
from typing import Any, cast

import redis

from scalepub.sharding import Keys

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

