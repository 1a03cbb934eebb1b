"""The shard's heartbeat hash ``{prefix}:{N}:alive``, and why it cannot publish right now.

`scalepub status` reads the hash: a key that expired means a dead shard; ``problem`` says
what holds a live one up (empty when all is well). It names a cause, never entry content.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aredis

from scalepub.shard.stats import Stats
from scalepub.sharding import Keys

# Runs a Redis call through outages (retry.Retrier).
Retrying = Callable[[Callable[[], Awaitable[None]]], Awaitable[None]]

HEARTBEAT_INTERVAL_S = 2.0  # the key lives 5 intervals: `scalepub status` calls it dead after
XMPP_DOWN = "xmpp_down"
REDIS = "redis"


class Health:
    """What currently keeps the shard from publishing."""

    def __init__(self) -> None:
        self.xmpp_down = False
        self.redis_failing = 0  # Redis calls retrying through an outage right now
        self._refused: dict[str, str] = {}  # node → "refused: type/condition", until it passes

    def refused(self, node: str, error_type: str, condition: str) -> None:
        """The server refused a batch of ``node``, which waits for a retry."""
        self._refused[node] = f"refused: {error_type}/{condition}"

    def passed(self, node: str) -> None:
        """A batch of ``node`` was confirmed or dead-lettered: no longer held up."""
        self._refused.pop(node, None)

    @property
    def problem(self) -> str:
        """Empty when all is well, else short causes, e.g. ``refused: wait/resource-constraint``."""
        causes = [XMPP_DOWN] if self.xmpp_down else []
        if self.redis_failing:
            causes.append(REDIS)
        causes += sorted(set(self._refused.values()))
        return ", ".join(causes)


class Heartbeat:
    """Keeps the heartbeat hash of the worker's shard fresh."""

    def __init__(self, client: aredis.Redis, keys: Keys, shard: int, stats: Stats,
                 health: Health, retrying: Retrying) -> None:
        self.redis = client
        self.retrying = retrying
        self.key = keys.heartbeat(shard)
        self.stats = stats
        self.health = health

    async def loop(self) -> None:
        """Write the hash every interval, through Redis outages, until cancelled."""
        last_count, last_time = self.stats.published, time.monotonic()
        while True:
            now = time.monotonic()
            rate = (self.stats.published - last_count) / max(now - last_time, 1e-9)
            last_count, last_time = self.stats.published, now
            await self.retrying(functools.partial(self.beat, rate))
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    async def beat(self, rate: float) -> None:
        """Write the hash once."""
        fields: dict[Any, Any] = {
            "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(),
            "published": self.stats.published, "rate": round(rate, 1),
            "last_publish": self.stats.last_publish,
            "dead_lettered": self.stats.dead_lettered, "problem": self.health.problem,
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, mapping=fields)
            pipe.expire(self.key, int(HEARTBEAT_INTERVAL_S * 5))
            await pipe.execute()

    async def remove(self) -> None:
        """Delete the hash: a stopped shard is not a dead one."""
        await self.redis.delete(self.key)
