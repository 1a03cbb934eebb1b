"""Append entries to the shard streams: one Redis round trip assigns the seq and appends."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from scalepub import metrics
from scalepub.envelope import split_encode
from scalepub.settings import Settings
from scalepub.sharding import ENTRY_FIELD, Keys, shard_for

log = logging.getLogger(__name__)

# KEYS: stream, seq hash, meta hash.  ARGV: shards, maxlen, then (node, head, tail) triples.
# Checks the shard count this stream was written for, so producers and pool never disagree
# silently; then per entry: next per-node seq, splice it into the envelope, XADD.
APPEND_LUA = """
local recorded = redis.call('HGET', KEYS[3], 'shards')
if recorded and recorded ~= ARGV[1] then
  return redis.error_reply('SHARDMISMATCH producer uses ' .. ARGV[1] ..
    ' shards but this stream belongs to a pool of ' .. recorded)
end
if not recorded then redis.call('HSET', KEYS[3], 'shards', ARGV[1]) end
local out = {}
for i = 3, #ARGV, 3 do
  local seq = redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*',
    'e', ARGV[i + 1] .. cmsgpack.pack(seq) .. ARGV[i + 2])
  out[#out + 1] = id
  out[#out + 1] = seq
end
return out
"""
assert ENTRY_FIELD == b"e", "APPEND_LUA writes the envelope under field 'e'"


@dataclass(frozen=True, slots=True)
class PendingEntry:
    """A serialized row waiting to be appended (seq not yet assigned)."""

    node: str
    ts_ns: int
    model: str
    pk: str
    fmt: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Appended:
    """Where an entry landed."""

    shard: int
    stream_id: str
    seq: int


class Spill(Protocol):
    """Takes entries that could not be appended; a durable outbox plugs in here."""

    def spill(self, entries: Sequence[PendingEntry], error: Exception) -> None:
        """Keep or report ``entries``; must not raise."""


class LogSpill:
    """Default spill: log each lost entry with node and pk, and count it."""

    def spill(self, entries: Sequence[PendingEntry], error: Exception) -> None:
        """Log and count; the entries are not kept."""
        for entry in entries:
            log.error("scalepub: entry not enqueued (node=%s model=%s pk=%s): %s",
                      entry.node, entry.model, entry.pk, error)
        metrics.ENQUEUE_FAILURES.labels(reason=_reason(error)).inc(len(entries))


def _reason(error: Exception) -> str:
    if isinstance(error, redis.ResponseError) and "SHARDMISMATCH" in str(error):
        return "shard_mismatch"
    return "redis"


def redis_client(settings: Settings) -> redis.Redis:
    """A client whose every call is bounded by ``redis_timeout`` (one quick retry, no backoff)."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


class StreamProducer:
    """Appends entries to their shard streams; never raises for Redis trouble, spills instead."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 spill: Spill | None = None) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.client = client if client is not None else redis_client(settings)
        self.spill = spill if spill is not None else LogSpill()
        self._append = self.client.register_script(APPEND_LUA)

    def enqueue(self, entries: Sequence[PendingEntry]) -> list[Appended] | None:
        """Append ``entries`` (order kept per node); None if they went to the spill instead."""
        by_shard: dict[int, list[PendingEntry]] = defaultdict(list)
        for entry in entries:
            by_shard[shard_for(entry.node, self.settings.shards)].append(entry)
        try:
            results = self._run(by_shard)
        except redis.RedisError as exc:
            self.spill.spill(entries, exc)
            return None
        metrics.ENTRIES_ENQUEUED.inc(len(entries))
        return results

    def _run(self, by_shard: dict[int, list[PendingEntry]]) -> list[Appended]:
        if len(by_shard) == 1:  # the common case, one save: a single EVALSHA
            [(shard, batch)] = by_shard.items()
            return _appended(shard, self._call(shard, batch, self.client))
        pipe = self.client.pipeline(transaction=False)
        for shard, batch in by_shard.items():
            self._call(shard, batch, pipe)
        replies = pipe.execute()
        return [a for shard, reply in zip(by_shard, replies, strict=True)
                for a in _appended(shard, reply)]

    def _call(self, shard: int, batch: list[PendingEntry], client: redis.Redis) -> list[object]:
        args: list[bytes | str | int] = [self.settings.shards, self.settings.stream_maxlen]
        for e in batch:
            head, tail = split_encode(
                e.node, ts_ns=e.ts_ns, model=e.model, pk=e.pk, fmt=e.fmt, payload=e.payload
            )
            args += [e.node, head, tail]
        keys = [self.keys.stream(shard), self.keys.seqs(shard), self.keys.meta(shard)]
        reply: list[object] = self._append(keys=keys, args=args, client=client)
        return reply

    def close(self) -> None:
        """Release the connection pool."""
        self.client.close()


def _appended(shard: int, reply: list[object]) -> list[Appended]:
    pairs = zip(reply[::2], reply[1::2], strict=True)
    return [Appended(shard, _text(sid), int(str(seq))) for sid, seq in pairs]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
