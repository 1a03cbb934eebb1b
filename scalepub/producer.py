"""Append entries to the shard streams and their nodes' histories: one Redis round trip per
shard assigns the seq and appends; refusals come back as a ``Refusal`` with a message."""

from __future__ import annotations

import enum
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import hiredis
import msgpack
import redis
from redis.exceptions import RedisClusterException

from scalepub import metrics
from scalepub.backlog import APPENDED_FIELD, CAUGHT_UP_LUA, DONE_FIELD
from scalepub.connections import (
    TRANSIENT_ERRORS,
    cluster_of,
    raise_transport_error,
    run_script,
    script_missing,
    sync_client,
    unreplicated,
    wait_replicas,
)
from scalepub.envelope import VERSION, split_encode_many
from scalepub.settings import Settings
from scalepub.sharding import CONSUMER_GROUP, ENTRY_FIELD, Keys, shard_for

log = logging.getLogger(__name__)

# KEYS: stream, seq hash, meta hash, the outbox's record of its last call to this shard (the
# meta hash again when no outbox calls), then each entry's node history stream.
# ARGV: shards, maxlen, consumer group, msgpack list of 'outbox id:ts' (or ''), history maxlen,
# history TTL (s), then (node, head, tail) triples. In order:
# 1. Refuse if the shard count differs from the one this stream was written for.
# 2. Entries whose outbox id is in the record were appended by a call whose reply was lost
#    (a timeout after Redis ran it): answer their recorded id and seq, append nothing.
# 3. Backpressure: entries waiting for the pool (appended - done, the meta hash's counters,
#    scalepub/backlog.py) stay within MAXLEN, so trimming never drops an entry nobody
#    published. Entries that do not fit are answered nil (the caller keeps them); the rest get
#    the next per-node seq spliced into their envelope, an XADD to the shard stream and one to
#    the node's history (id <seq>-0, newest HISTORY_MAXLEN kept, expiring HISTORY_TTL_S after
#    the node's newest entry).
# 4. Record this call's (outbox id, stream id, seq) triples for step 2 of the next call.
APPEND_LUA = CAUGHT_UP_LUA + """
local recorded = redis.call('HGET', KEYS[3], 'shards')
if recorded and recorded ~= ARGV[1] then
  return redis.error_reply('SHARDMISMATCH producer uses ' .. ARGV[1] ..
    ' shards but this stream belongs to a pool of ' .. recorded)
end
if not recorded then redis.call('HSET', KEYS[3], 'shards', ARGV[1]) end
local oids = nil
local done = {}
if ARGV[4] ~= '' then
  oids = cmsgpack.unpack(ARGV[4])
  local record = redis.call('GET', KEYS[4])
  if record then
    local r = cmsgpack.unpack(record)
    for j = 1, #r, 3 do done[r[j]] = {r[j + 1], r[j + 2]} end
  end
end
local maxlen = tonumber(ARGV[2])
local counts = redis.call('HMGET', KEYS[3], 'appended', 'done')
local appended = tonumber(counts[1])
if not appended then
  -- first append with counters: every entry the stream holds counts as waiting until the
  -- pool is seen caught up
  appended = redis.call('XLEN', KEYS[1])
  counts[2] = 0
  redis.call('HSET', KEYS[3], 'appended', appended, 'done', 0)
end
local room = maxlen - (appended - tonumber(counts[2]))
if room < (#ARGV - 6) / 3 and caught_up(KEYS[1], ARGV[3]) then
  redis.call('HSET', KEYS[3], 'done', appended)
  room = maxlen
end
local hmax, httl = tonumber(ARGV[5]), tonumber(ARGV[6])
local out, record, n, added, touched = {}, {}, 0, 0, {}
for i = 7, #ARGV, 3 do
  n = n + 1
  local oid = oids and oids[n]
  local id, seq = false, false
  if oid and done[oid] then
    id, seq = done[oid][1], done[oid][2]
  elseif room > 0 then
    room = room - 1
    added = added + 1
    seq = redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
    local env = ARGV[i + 1] .. cmsgpack.pack(seq) .. ARGV[i + 2]
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', env)
    if hmax > 0 then
      local h = KEYS[4 + n]
      local add = {'XADD', h, 'MAXLEN', hmax, seq .. '-0', 'e', env, 'i', id}
      local ok = redis.pcall(unpack(add))
      if type(ok) == 'table' and ok.err then
        -- ids not below this seq: a history left from before its seq counter was reset
        redis.call('DEL', h)
        redis.call(unpack(add))
      end
      touched[h] = true
    end
  end
  out[#out + 1] = id
  out[#out + 1] = seq
  if oid and id then
    local k = #record
    record[k + 1], record[k + 2], record[k + 3] = oid, id, seq
  end
end
if added > 0 then redis.call('HINCRBY', KEYS[3], 'appended', added) end
if httl > 0 then
  for h in pairs(touched) do redis.call('EXPIRE', h, httl) end
end
if oids then redis.call('SET', KEYS[4], cmsgpack.pack(record), 'EX', 604800) end
return out
"""
assert ENTRY_FIELD == b"e", "APPEND_LUA writes the envelope under field 'e'"
assert (APPENDED_FIELD, DONE_FIELD) == ("appended", "done"), "APPEND_LUA's counter fields"
# The script's error reply when the shard count differs: recognised in one place (_refusal).
_SHARD_MISMATCH = "SHARDMISMATCH"
# How often a producer re-reads the shard count the pool recorded (one GET).
SHARD_COUNT_CHECK_S = 5.0
_NODES_KEPT = 4096  # nodes whose shard and history key a producer remembers


class Refusal(enum.Enum):
    """Why entries were not appended; the value is the metric label."""

    BACKPRESSURE = "backpressure"  # STREAM_MAXLEN entries of the shard wait for the pool
    SHARD_MISMATCH = "shard_mismatch"  # the stream was written for another shard count
    REDIS = "redis"  # Redis unreachable, timed out or answered an error
    # Appended, but fewer than REDIS_WAIT_REPLICAS replicas confirmed them in time: the outbox
    # keeps the rows (a failover could lose the entries); the next round re-appends nothing
    # that landed (the append script's record) and waits again.
    REPLICATION = "replication"


# Named tuples, not frozen dataclasses: the relay makes one of each per row it moves, and a
# frozen dataclass's __init__ sets every field through object.__setattr__ (3.0 against
# 1.4 us for PendingEntry here, time the relay thread holds the GIL the saves wait for).
class PendingEntry(NamedTuple):
    """A serialized row waiting to be appended (seq not yet assigned)."""

    node: str
    ts_ns: int
    model: str
    pk: str
    fmt: str
    payload: bytes
    oid: int | None = None  # its outbox row id, when the relay appends it


class Appended(NamedTuple):
    """Where an entry landed."""

    shard: int
    stream_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class ShardFailure:
    """Entries of one shard that were not appended, why, and what Redis said."""

    shard: int
    entries: list[PendingEntry]
    reason: Refusal
    message: str


@dataclass(slots=True)
class AppendResult:
    """What one ``append`` call achieved."""

    appended: list[Appended]
    failures: list[ShardFailure]


class Spill(Protocol):
    """Takes entries that could not be appended; a durable outbox plugs in here."""

    def spill(self, entries: Sequence[PendingEntry], reason: Refusal, message: str) -> None:
        """Keep or report ``entries``; must not raise."""


class LogSpill:
    """Default spill: log each lost entry with node and pk, and count it."""

    def spill(self, entries: Sequence[PendingEntry], reason: Refusal, message: str) -> None:
        """Log each entry; the entries are not kept."""
        for entry in entries:
            log.error("scalepub: entry not enqueued (node=%s model=%s pk=%s): %s: %s",
                      entry.node, entry.model, entry.pk, reason.value, message)


class StreamProducer:
    """Appends entries to their shard streams; never raises for Redis trouble, spills instead."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 spill: Spill | None = None, single_thread: bool = False) -> None:
        """``single_thread``: only one thread ever appends (the outbox relay), so the
        appends may keep one connection of their own (``AppendConnection``)."""
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.client = client if client is not None else sync_client(settings)
        self.spill = spill if spill is not None else LogSpill()
        self._append = self.client.register_script(APPEND_LUA)
        self._own = (AppendConnection(self.client, self._append)
                     if single_thread and OWN_CONNECTION and cluster_of(self.client) is None
                     else None)
        self._pool_shards: int | None = None  # the count the pool recorded, as last read
        self._nodes: dict[str, tuple[int, str]] = {}  # _node_keys
        self._pool_shards_at = -SHARD_COUNT_CHECK_S
        # Replicas that must have an outbox row's entry before the row is deleted.
        self.wait_replicas = wait_replicas(settings)
        # Version 2 (the entry's XML as the shard sends it) needs a pool that reads it;
        # version 1 is for a pool older than that (upgrade the pool first, docs/protocol.md).
        self.envelope_version = VERSION

    def enqueue(self, entries: Sequence[PendingEntry],
                spill: Spill | None = None) -> list[Appended] | None:
        """Append ``entries`` (order kept per node); None if any went to the spill instead.

        Never raises for Redis trouble: what could not be appended is counted and handed to
        ``spill`` (default: the producer's).
        """
        try:
            result = self.append(entries)
        except redis.RedisError as exc:
            self._spill(spill, entries, Refusal.REDIS, str(exc))
            return None
        for failure in result.failures:
            self._spill(spill, failure.entries, failure.reason, failure.message)
        return None if result.failures else result.appended

    def _spill(self, spill: Spill | None, entries: Sequence[PendingEntry], reason: Refusal,
               message: str) -> None:
        metrics.ENQUEUE_FAILURES.labels(reason=reason.value).inc(len(entries))
        (spill or self.spill).spill(entries, reason, message)

    def append(self, entries: Sequence[PendingEntry], source: str = "") -> AppendResult:
        """Append ``entries``, one script per shard, order kept per node.

        A shard that refuses (shard count mismatch, backpressure) does not stop the others:
        its entries come back in ``failures``. Raises ``redis.RedisError`` when Redis cannot
        be reached; then any of the entries may or may not have been appended. With a
        ``source`` (an outbox's database) and entries carrying their outbox ``oid``, appending
        the same entries again after such an error returns where they landed instead.
        """
        by_shard: dict[int, list[PendingEntry]] = defaultdict(list)
        for entry in entries:
            by_shard[self._node_keys(entry.node)[0]].append(entry)
        result = AppendResult([], [])
        if self._disagrees(by_shard, result):
            return result
        for shard, reply in zip(by_shard, self._run(by_shard, source), strict=True):
            batch = by_shard[shard]
            if isinstance(reply, redis.ResponseError):
                result.failures.append(ShardFailure(shard, batch, _refusal(reply), str(reply)))
                continue
            pairs = list(zip(reply[::2], reply[1::2], strict=True))
            result.appended += [Appended(shard, _text(sid), int(seq))  # int or its digits
                                for sid, seq in pairs if sid is not None]
            refused = [e for e, (sid, _) in zip(batch, pairs, strict=True) if sid is None]
            if refused:  # the stream took only what fit under MAXLEN
                result.failures.append(ShardFailure(
                    shard, refused, Refusal.BACKPRESSURE,
                    f"{self.settings.stream_maxlen} entries of shard {shard} wait for the "
                    f"pool (STREAM_MAXLEN): {len(refused)} entries refused"))
        if source and self.wait_replicas and result.appended:
            self._confirm_replicated(by_shard, result)
        metrics.ENTRIES_ENQUEUED.inc(len(result.appended))
        return result

    def _confirm_replicated(self, by_shard: dict[int, list[PendingEntry]],
                            result: AppendResult) -> None:
        """Turn the appends of shards whose replicas did not confirm them into failures."""
        shards = {a.shard for a in result.appended}
        timeout_ms = max(1, int(self.settings.redis_timeout * 500))  # within the socket timeout
        unconfirmed = unreplicated(self.client, {s: self.keys.wait_probe(s) for s in shards},
                                   self.wait_replicas, timeout_ms)
        if not unconfirmed:
            return
        refused = {id(e) for f in result.failures for e in f.entries}
        for shard in sorted(unconfirmed):
            result.failures.append(ShardFailure(
                shard, [e for e in by_shard[shard] if id(e) not in refused], Refusal.REPLICATION,
                f"shard {shard}: fewer than {self.wait_replicas} replica(s) confirmed its "
                f"entries within {timeout_ms} ms (REDIS_WAIT_REPLICAS); the rows stay"))
        result.appended = [a for a in result.appended if a.shard not in unconfirmed]

    def _disagrees(self, by_shard: dict[int, list[PendingEntry]], result: AppendResult) -> bool:
        """Refuse everything if the pool recorded another shard count (re-read every
        SHARD_COUNT_CHECK_S): the append script refuses by a stream's own record, and a stream
        beyond the pool's count has none, so its entries would wait there unread."""
        now = time.monotonic()
        if now - self._pool_shards_at >= SHARD_COUNT_CHECK_S:
            try:
                recorded = self.client.get(self.keys.shard_count)
            except TRANSIENT_ERRORS:  # e.g. its cluster master failing over: the shards' own
                pass  # scripts still refuse what they can; asked again with the next call
            else:
                self._pool_shards = int(recorded) if recorded is not None else None
                self._pool_shards_at = now
        pool = self._pool_shards
        if pool is None or pool == self.settings.shards:
            return False
        result.failures += _pool_count_refusals(self, by_shard, pool)
        return True

    def _run(self, by_shard: dict[int, list[PendingEntry]], source: str) -> list[Any]:
        if self._own is not None:
            return self._own.run([self._script_args(shard, batch, source)
                                  for shard, batch in by_shard.items()])
        if len(by_shard) == 1:  # the common case, one save: a single EVALSHA
            [(shard, batch)] = by_shard.items()
            try:
                return [self._call(shard, batch, source, self.client)]
            except redis.ResponseError as exc:  # the script refused: not a transport error
                return [exc]
            except RedisClusterException as exc:  # no node answers, a slot without master
                raise redis.ConnectionError(str(exc)) from exc
        pipe = self.client.pipeline(transaction=False)
        for shard, batch in by_shard.items():
            self._call(shard, batch, source, pipe)
        replies = list(pipe.execute(raise_on_error=False))
        for i, (shard, batch) in enumerate(by_shard.items()):
            if script_missing(replies[i]):  # a cluster node without the script: it did not run
                replies[i] = self._run({shard: batch}, source)[0]
            # A cluster pipeline answers a node it could not reach with the error itself: as
            # on one Redis, that makes the whole call fail (the relay's record sorts out which
            # shards had appended when the call is made again).
            raise_transport_error(replies[i])
        return replies

    def _call(self, shard: int, batch: list[PendingEntry], source: str,
              client: redis.Redis) -> list[object]:
        keys, args = self._script_args(shard, batch, source)
        reply: list[object] = run_script(self._append, keys, args, client)
        return reply

    def _script_args(self, shard: int, batch: list[PendingEntry],
                     source: str) -> tuple[list[str], list[bytes | str | int]]:
        """The append script's KEYS and ARGV for ``batch`` of ``shard``."""
        meta = self.keys.meta(shard)
        keys = [self.keys.stream(shard), self.keys.seqs(shard), meta,
                self.keys.relay_record(shard, source) if source else meta]
        keys += [self._node_keys(e.node)[1] for e in batch]
        oids = b""
        if source:
            # with the save time: a database that reuses the ids of deleted rows (MySQL before
            # 8.0 after a restart) must not make a new row look appended already
            oids = msgpack.packb([f"{e.oid}:{e.ts_ns}" for e in batch])
        args: list[bytes | str | int] = [self.settings.shards, self.settings.stream_maxlen,
                                         CONSUMER_GROUP, oids, self.settings.history_maxlen,
                                         self.settings.history_ttl_s]
        head, tails = split_encode_many(batch, self.envelope_version)
        for e, tail in zip(batch, tails, strict=True):
            args += [e.node, head, tail]
        return keys, args

    def _node_keys(self, node: str) -> tuple[int, str]:
        """``node``'s shard and history key, worked out once per node (per-author nodes
        repeat; the relay appends hundreds of entries a round)."""
        known = self._nodes.get(node)
        if known is None:
            if len(self._nodes) >= _NODES_KEPT:
                self._nodes.clear()
            shard = shard_for(node, self.settings.shards)
            known = self._nodes[node] = (shard, self.keys.history(shard, node))
        return known

    def close(self) -> None:
        """Release the connection pool."""
        if self._own is not None:
            self._own.close()
        self.client.close()


# False: every append goes through redis-py's client (the A/B baseline of
# loadtest/bench_ingest.py's mode outbox-rc)
OWN_CONNECTION = True


class AppendConnection:
    """One connection of a single Redis's pool, kept by a caller that appends from one
    thread only (the outbox relay; the shard's asyncio reads have their own,
    ``connections.OwnConnection``): its script calls skip redis-py's per-command pool
    checkout and release, retry wrapper and instrumentation, ~65 us of the ~115 us an EVALSHA
    cost the client here; the relay makes one per round. Several calls go out as one
    pipeline. As the client does (``connections.sync_client``), a broken connection is tried
    once more on a new one, a timeout never (the relay's retry record recognises entries a
    lost reply had appended)."""

    def __init__(self, client: redis.Redis, script: Any) -> None:
        self.pool, self.script = client.connection_pool, script
        self.connection: Any = None

    def run(self, calls: list[tuple[list[str], list[bytes | str | int]]]) -> list[Any]:
        """Each call's reply, or the ResponseError the script answered for it."""
        try:
            return self._run(calls)
        except redis.ConnectionError:
            self.close()  # e.g. Redis closed it while it was idle: once more on a new one
        except BaseException:  # a timeout (its reply may still come): never read it later
            self.close()
            raise
        try:
            return self._run(calls)
        except BaseException:
            self.close()
            raise

    def _run(self, calls: list[tuple[list[str], list[bytes | str | int]]]) -> list[Any]:
        replies = self._send(calls)
        missing = [i for i, reply in enumerate(replies) if script_missing(reply)]
        if missing:  # the server lost its scripts (restart, SCRIPT FLUSH): load, send again
            self._send([], load=True)
            for i, reply in zip(missing, self._send([calls[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    def _send(self, calls: list[tuple[list[str], list[bytes | str | int]]],
              load: bool = False) -> list[Any]:
        conn = self.connection
        if conn is None:
            conn = self.connection = self.pool.get_connection()
        commands: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", self.script.script)] if load else [
            ("EVALSHA", self.script.sha, len(keys), *keys, *args) for keys, args in calls]
        # hiredis packs in C: redis-py's packer encodes each argument in Python (~1 us each,
        # a relay round of 500 rows has ~3,000)
        conn.send_packed_command([hiredis.pack_command(c) for c in commands])
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # this call's error reply; read the next
                replies.append(exc)
        return replies

    def close(self) -> None:
        """Close the connection (the next call opens another)."""
        conn, self.connection = self.connection, None
        if conn is not None:
            conn.disconnect()
            self.pool.release(conn)


def _pool_count_refusals(producer: StreamProducer, by_shard: dict[int, list[PendingEntry]],
                         pool: int) -> list[ShardFailure]:
    """Every shard's entries refused: the pool runs with another shard count."""
    message = (f"{_SHARD_MISMATCH} producer uses {producer.settings.shards} shards but the pool "
               f"runs with {pool} ({producer.keys.shard_count})")
    return [ShardFailure(shard, batch, Refusal.SHARD_MISMATCH, message)
            for shard, batch in by_shard.items()]


def _refusal(error: redis.ResponseError) -> Refusal:
    """The reason behind an error reply of the append script."""
    return Refusal.SHARD_MISMATCH if str(error).startswith(_SHARD_MISMATCH) else Refusal.REDIS


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
