"""Every Redis client scalepub makes: the URL, the timeouts, retries and health checks, once.

The producer, the outbox relay, ``scalepub status`` and the history endpoint use the
synchronous client; the shard pool's processes use the asyncio one. Redis Cluster plugs in
here (``scalepub.settings`` validates the URL before anything connects).
"""

from __future__ import annotations

from typing import Any

import hiredis
import redis
import redis.asyncio as aredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scalepub.settings import Settings

# A shard's blocking XREADGROUP waits up to this long: its socket timeout must be longer.
SHARD_SOCKET_TIMEOUT_S = 5.0
SHARD_CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30


def sync_client(settings: Settings, *, timeout: float | None = None) -> redis.Redis:
    """A client whose every call is bounded by ``redis_timeout`` (one quick retry, no backoff).

    ``timeout`` overrides ``redis_timeout`` (e.g. the pool's start-up check, which may wait
    longer than a Django save should).
    """
    seconds = settings.redis_timeout if timeout is None else timeout
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=seconds,
        socket_connect_timeout=seconds,
        # Once more on a broken connection (e.g. a pooled one Redis closed), never on a
        # timeout: the command may have run, and appending twice would duplicate entries.
        retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
    )


def shard_client(settings: Settings) -> aredis.Redis:
    """The asyncio client of one shard process: hiredis packing, raw stream replies."""
    return raw_replies(aredis.Redis.from_url(
        settings.redis_url,
        socket_timeout=max(SHARD_SOCKET_TIMEOUT_S, settings.redis_timeout),
        socket_connect_timeout=max(SHARD_CONNECT_TIMEOUT_S, settings.redis_timeout),
        connection_class=HiredisPackedConnection,
    ))


class HiredisPackedConnection(aredis.Connection):
    """Packs commands with hiredis (C). redis-py's asyncio connection packs each argument in
    Python, ~4 us an id measured; XACK of every published entry then costs a shard more than
    all its other work."""

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0]
        if isinstance(name, str) and " " in name:  # e.g. "XGROUP CREATE"
            args = (*name.split(), *args[1:])
        return [hiredis.pack_command(args)]


def raw_replies(r: aredis.Redis) -> aredis.Redis:
    """Skip redis-py's per-entry reply parsing (dicts) for the reads; ~3 us an entry."""
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        r.set_response_callback(command, lambda response, **_kw: response)
    return r
