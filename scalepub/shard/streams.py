"""The shard's side of the Redis streams: the consumer group, claims and re-reads, the ack
script's body (fenced by the lease in acks.py), reading back an envelope.

Also the start-up check that the pool runs with the shard count the producers wrote for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, cast

import redis
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from scalepub.backlog import CAUGHT_UP_LUA, DONE_FIELD, meta_of, misread
from scalepub.sharding import CONSUMER_GROUP, ENTRY_FIELD, Keys

# Dead-letter streams keep the newest entries only; they are for inspection and replay.
DEAD_LETTER_MAXLEN = 100_000

# Raw replies (scalepub.connections.raw_replies): [stream id, [field, value, ...] or None
# for a deleted entry].
StreamEntries = list[tuple[bytes, list[bytes] | None]]

ACK_CHUNK = 10_000

# ack(stream, meta, group, first): XACK ARGV[first..], and count in the meta hash's 'done'
# what XACK really removed (a repeated ack counts nothing), so appended - done stays the number
# of waiting entries across Redis restarts (scalepub/backlog.py). When nothing is left waiting,
# done is set to appended: drift (an upgrade, pending entries trimmed away) heals by itself.
# Lua's unpack takes at most ~8000 values: XACK in slices. The fenced ack script (acks.py)
# calls it after checking the lease.
ACK_FUNCTION_LUA = CAUGHT_UP_LUA + """
local function ack(stream, meta, group, first)
  local n = 0
  for i = first, #ARGV, 1000 do
    n = n + redis.call('XACK', stream, group, unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  if n > 0 then redis.call('HINCRBY', meta, 'done', n) end
  if caught_up(stream, group) then
    local appended = redis.call('HGET', meta, 'appended')
    if appended then redis.call('HSET', meta, 'done', appended) end
  end
  return n
end
"""
assert DONE_FIELD == "done", "ACK_FUNCTION_LUA's counter field"


class ShardCountMismatch(RuntimeError):
    """Entries are waiting in streams written for another shard count."""


async def ensure_group(r: aredis.Redis, key: str) -> None:
    """Create the consumer group (and the stream) if missing."""
    try:
        await r.xgroup_create(key, CONSUMER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def claim_pending(r: aredis.Redis, key: str, consumer: str, cursor: bytes,
                        count: int) -> tuple[bytes, StreamEntries, int]:
    """Take over pending entries of any consumer (a dead predecessor), oldest first.

    Returns the next cursor (``b"0-0"`` when done), the entries, and how many pending ids
    pointed at entries already trimmed away (lost to MAXLEN).
    """
    reply = await r.xautoclaim(key, CONSUMER_GROUP, consumer, min_idle_time=0,
                               start_id=cursor, count=count)
    next_cursor, entries = reply[0], reply[1]
    deleted = reply[2] if len(reply) > 2 else []
    if deleted:  # XAUTOCLAIM dropped them from the pending list: no longer waiting
        await r.hincrby(meta_of(key), DONE_FIELD, len(deleted))
    return next_cursor, cast(StreamEntries, entries), len(deleted)


async def read_own_pending(r: aredis.Redis, after: Mapping[str, bytes], consumer: str,
                           count: int) -> list[tuple[bytes, StreamEntries]]:
    """This consumer's pending entries with ids after ``after[stream]``, oldest first.

    After a read whose reply was lost (Redis went away while answering), the entries it
    delivered are pending for this consumer but were never seen: they are found here.
    """
    if len(after) > 1 and isinstance(r, RedisCluster):
        # One XREADGROUP may only name keys of one hash slot: one read per stream, at once.
        parts = await asyncio.gather(*(read_own_pending(r, {key: at}, consumer, count)
                                       for key, at in after.items()))
        return [reply for part in parts for reply in part]
    streams: dict[Any, Any] = dict(after)  # redis-py's key type is invariant
    reply = await r.xreadgroup(CONSUMER_GROUP, consumer, streams, count=count)
    if isinstance(reply, dict):  # RESP3 (redis-py 8's default) maps stream → entries
        return cast(list[tuple[bytes, StreamEntries]], list(reply.items()))
    return cast(list[tuple[bytes, StreamEntries]], reply or [])


async def envelope_of(r: aredis.Redis, key: str, stream_id: bytes) -> bytes:
    """The envelope of entry ``stream_id`` (b"" if it is gone); a pending entry is never
    trimmed (backpressure), so a shard reads back what it did not keep (publisher.py)."""
    found: Any = await r.xrange(key, stream_id, stream_id, count=1)
    for _sid, fields in found or []:
        if isinstance(fields, dict):
            value = fields.get(ENTRY_FIELD, fields.get(ENTRY_FIELD.decode()))
            return bytes(value or b"")
        values = list(fields or [])
        return bytes(values[1]) if len(values) == 2 and values[0] == ENTRY_FIELD else b""
    return b""


def agree_shard_count(r: redis.Redis, keys: Keys, shards: int) -> int | None:
    """Record ``shards`` as the count; refuse if entries wait in a stream it would misread.

    A stream is misread if entries wait in it (unread or pending) and it was written for
    another count (its meta) or lies beyond the pool's shards: those entries would never be
    published, or published by the wrong shard. Streams without waiting entries just get the
    new count. Returns the previously recorded count if it changed, else None.
    """
    previous = r.get(keys.shard_count)
    found = misread(r, keys, shards)
    if found:
        detail = ", ".join(f"{m.backlog.key} (written for {m.written_for} shards): "
                           f"{m.backlog.lag} unread, {m.backlog.pending} pending" for m in found)
        counts = sorted({m.written_for for m in found if m.written_for is not None})
        raise ShardCountMismatch(
            f"the pool runs with {shards} shards but entries wait in streams written for "
            f"another count: {detail}. Run the pool with --shards "
            f"{' or '.join(map(str, counts)) or 'as before'} until they are drained, then "
            "change the count of producers and pool together."
        )
    metas = list(r.scan_iter(match=f"{keys.prefix}:{{*}}:meta", count=1000))
    with r.pipeline(transaction=False) as pipe:
        pipe.set(keys.shard_count, shards)
        for meta in metas:
            pipe.hset(meta, "shards", shards)
        for shard in range(shards):
            pipe.hset(keys.meta(shard), "shards", shards)
        pipe.execute()
    was = int(previous) if previous is not None else None
    return was if was not in (None, shards) else None
