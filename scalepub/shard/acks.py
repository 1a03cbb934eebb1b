"""Acknowledging what the server confirmed, and moving entries to the dead-letter stream."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable

import redis
import redis.asyncio as aredis

from scalepub.shard import streams
from scalepub.shard.heartbeat import Health, Retrying
from scalepub.shard.stats import Meters, Stats
from scalepub.sharding import Keys

log = logging.getLogger(__name__)

_ACK_RETRY_S = 0.5

Spawn = Callable[[Awaitable[None]], None]


class Acks:
    """XACKs gathered while replies arrive and sent in one pipeline; dead letters."""

    def __init__(self, name: str, client: aredis.Redis, keys: Keys, stats: Stats,
                 meters: Meters, health: Health, retrying: Retrying, spawn: Spawn) -> None:
        self.name = name
        self.retrying = retrying
        self.spawn = spawn
        self.redis = client
        self.keys = keys
        self.stats = stats
        self.meters = meters
        self.health = health
        self._ids: dict[int, list[bytes]] = defaultdict(list)
        self._wakeup = asyncio.Event()
        self._failing = False

    def add(self, shard: int, ids: Iterable[bytes]) -> None:
        """Acknowledge ``ids`` of ``shard`` with the next flush."""
        self._ids[shard].extend(ids)
        self._wakeup.set()

    async def loop(self) -> None:
        """Flush whenever there is something to acknowledge, until cancelled."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send the gathered XACKs; on a Redis error keep them for the next flush."""
        ids, self._ids = self._ids, defaultdict(list)
        if not ids:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for shard, shard_ids in ids.items():
                    streams.queue_acks(pipe, self.keys.stream(shard), shard_ids)
                await pipe.execute()
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

    def _set_failing(self, failing: bool) -> None:
        if failing != self._failing:
            self._failing = failing
            self.health.redis_failing += 1 if failing else -1

    def dead_letter(self, shard: int, sid: bytes, raw: bytes, reason: str) -> None:
        """Move one entry to the dead-letter stream (acknowledging it), in the background."""
        self.stats.dead_lettered += 1
        self.meters.dead_letter(shard)
        log.error("shard %d: entry %s dead-lettered: %s", shard, sid.decode(), reason)
        self.spawn(self.retrying(lambda: streams.dead_letter(
            self.redis, self.keys, shard, stream_id=sid, envelope=raw, reason=reason)))
