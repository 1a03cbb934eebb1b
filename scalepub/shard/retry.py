"""Redis calls of a shard that wait out an outage instead of failing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis
import redis.asyncio as aredis

from scalepub.connections import TRANSIENT_ERRORS
from scalepub.shard import policy, streams
from scalepub.shard.heartbeat import Health
from scalepub.shard.stats import Meters

log = logging.getLogger(__name__)
T = TypeVar("T")

_RETRY_WARN_EVERY_S = 10.0


class Retrier:
    """Runs one Redis call until it succeeds, backing off; re-creates a lost consumer group."""

    def __init__(self, name: str, client: aredis.Redis, stream_keys: Sequence[str],
                 meters: Meters, health: Health, giving_up: Callable[[], bool]) -> None:
        self.name = name
        self.redis = client
        self.stream_keys = list(stream_keys)
        self.meters = meters
        self.health = health
        self.giving_up = giving_up  # True while stopping: then an outage ends the call

    async def __call__(self, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()``, retried through Redis outages and a deleted group."""
        delay = policy.REDIS_RETRY_FIRST_S
        warned = -_RETRY_WARN_EVERY_S
        failing = False
        try:
            while True:
                try:
                    return await call()
                except TRANSIENT_ERRORS as exc:  # an outage, a failover, a slot migrating
                    if self.giving_up():
                        raise  # stopping: what is not done stays pending, nothing is lost
                    if not failing:
                        failing = True
                        self.health.redis_failing += 1
                    warned = self._unavailable(exc, delay, warned)
                except redis.ResponseError as exc:
                    await self._regroup(exc)
                await asyncio.sleep(delay)
                delay = policy.backoff(delay, policy.REDIS_RETRY_MAX_S)
        finally:
            if failing:
                self.health.redis_failing -= 1

    def _unavailable(self, exc: Exception, delay: float, warned: float) -> float:
        self.meters.errors("redis").inc()
        # several loops retry, each every ≤ 2 s: a WARNING at most every 10 s each
        now = time.monotonic()
        quiet = now - warned < _RETRY_WARN_EVERY_S
        log.log(logging.DEBUG if quiet else logging.WARNING,
                "shard %s: Redis unavailable (%s), retrying in %.1f s", self.name, exc, delay)
        return warned if quiet else now

    async def _regroup(self, exc: redis.ResponseError) -> None:
        if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
            raise exc
        # The stream or its group was deleted (or Redis restarted without its data).
        log.warning("shard %s: %s; re-creating the consumer group", self.name, exc)
        for key in self.stream_keys:
            await streams.ensure_group(self.redis, key)
