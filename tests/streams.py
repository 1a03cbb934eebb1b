"""Streams for tests: append entries, read back what producers appended, wait for the pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import cast

import redis

from scalepub.backlog import backlogs
from scalepub.connections import shard_client
from scalepub.envelope import Envelope, decode
from scalepub.producer import PendingEntry, StreamProducer
from scalepub.settings import Settings
from scalepub.shard import acks, streams
from scalepub.shard.lease import LeaseTiming, ShardLease
from scalepub.sharding import ENTRY_FIELD, Keys

# XRANGE's reply on a client without decode_responses (redis-py types it for decoded and
# deleted entries too), and a one-key XREADGROUP's: [[stream, entries]].
RawEntries = list[tuple[bytes, dict[bytes, bytes]]]
RawRead = list[tuple[bytes, RawEntries]]


@dataclass(frozen=True)
class StoredEntry:
    """An envelope and where it sits."""

    shard: int
    stream_id: str
    env: Envelope


def read_all(client: redis.Redis, settings: Settings) -> list[StoredEntry]:
    """Every entry of every shard stream, in stream order per shard."""
    keys = Keys(settings.key_prefix)
    out = []
    for shard in range(settings.shards):
        for sid, fields in cast(RawEntries, client.xrange(keys.stream(shard))):
            out.append(StoredEntry(shard, sid.decode(), decode(fields[ENTRY_FIELD])))
    return out


def wait_for_entries(client: redis.Redis, settings: Settings, count: int,
                     timeout: float = 30.0) -> list[StoredEntry]:
    """``read_all`` once it has at least ``count`` entries, or what is there at ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        entries = read_all(client, settings)
        if len(entries) >= count or time.monotonic() > deadline:
            return entries
        time.sleep(0.02)


def row(i: int, size: int = 300) -> bytes:
    """A serialized row of about ``size`` bytes."""
    text = (f"entry {i} " * (size // 8))[:size]
    return f"<row><text>{text}</text></row>".encode()


def produce(settings: Settings, nodes: list[str], per_node: int, size: int = 300,
            chunk: int = 250, refused_ok: bool = False) -> int:
    """Append ``per_node`` entries to each node (per-node order), ``chunk`` rounds a call.

    Returns how many entries a shard refused (shard count, backpressure): none unless
    ``refused_ok``.
    """
    producer = StreamProducer(settings)
    refused = 0
    try:
        for start in range(0, per_node, chunk):
            rows = [PendingEntry(n, time.time_ns(), "t.row", str(i), "xml", row(i, size))
                    for i in range(start, min(start + chunk, per_node)) for n in nodes]
            refused += sum(len(f.entries) for f in producer.append(rows).failures)
    finally:
        producer.close()
    assert refused_ok or not refused, f"{refused} entries refused"
    return refused


def drained(settings: Settings, client: redis.Redis | None = None) -> bool:
    """Every shard stream under the prefix exists, is read to its end and fully acknowledged;
    False while Redis does not answer (e.g. during its restart)."""
    own = client is None
    client = client or redis.Redis.from_url(settings.redis_url)
    try:
        found = backlogs(client, Keys(settings.key_prefix))
        return bool(found) and all(b.lag == 0 and b.pending == 0 for b in found)
    except redis.RedisError:
        return False
    finally:
        if own:
            client.close()


class FencedConsumer:
    """One shard's group reads, acks and dead letters as a shard process makes them, under the
    shard's lease (``async with``): for tests of what producers and `status` count."""

    def __init__(self, settings: Settings, shard: int = 0, owner: str = "tests") -> None:
        self.keys = Keys(settings.key_prefix)
        self.shard = shard
        self.key = self.keys.stream(shard)
        self.redis = shard_client(settings)
        self.lease = ShardLease(self.redis, self.keys, shard, owner,
                                LeaseTiming(settings.lease_ttl_s, settings.lease_renew_s))

    async def __aenter__(self) -> FencedConsumer:
        await streams.ensure_group(self.redis, self.key)
        assert await self.lease.acquire(asyncio.Event())
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None
                        ) -> None:
        await self.lease.release()
        await self.redis.aclose()

    async def read(self, count: int, consumer: str = "c") -> streams.StreamEntries:
        """Up to ``count`` new entries for ``consumer`` (the fenced group read)."""
        replies = await self.lease.read_new(self.redis, [self.key], consumer, count, 100)
        return [entry for _, entries in replies for entry in entries]

    async def ack(self, ids: Sequence[bytes]) -> int:
        """The fenced ack script: how many ids XACK removed."""
        async with self.redis.pipeline(transaction=False) as pipe:
            acks.queue_acks(pipe, self.keys, self.shard, self.lease.fence, ids)
            replies = await pipe.execute()
        return sum(int(r) for r in replies)

    async def dead_letter(self, stream_id: bytes, envelope: bytes, reason: str) -> int:
        """The fenced dead-letter script for one entry."""
        return await acks.dead_letter(self.redis, self.keys, self.shard, self.lease.fence,
                                      stream_id=stream_id, envelope=envelope, reason=reason)
