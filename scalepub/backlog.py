"""How far the pool is behind on each shard stream: entries never read (lag) and read but not
yet acknowledged (pending). Read by ``scalepub status``, the pool's gauges, its start-up check
and (as Lua) the append script's backpressure; never imports the pool itself.

Why not XINFO GROUPS' ``lag``: after Redis rewrites its AOF and restarts, a consumer group's
entries-read counter comes back from the rewritten file and the replayed log never advances
it (XREADGROUP is logged as XCLAIM ... LASTID), so ``lag`` grows with every rewrite-and-restart
cycle and never returns to 0. The figures used here survive a restart: the project's own
counters in the shard's meta hash (``appended`` by the append script, ``done`` by the ack
script, both atomic with the stream change they count), the group's pending count (its PEL)
and last-delivered id against the stream's last id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis

from scalepub.sharding import CONSUMER_GROUP, Keys

# Fields of the shard's meta hash: entries ever appended, and entries acknowledged (published
# or dead-lettered) or found trimmed while pending. appended - done = entries waiting.
APPENDED_FIELD = "appended"
DONE_FIELD = "done"

# Lua: caught_up(stream, group) is true when nothing waits: the group read up to the stream's
# last id and holds no pending entry (or there is no stream). The scripts then set done to
# appended, which heals any drift of the counters (an upgrade from a version without them, a
# stream deleted by hand). Two O(1) XINFO calls; run when an append would be refused and
# after each ack.
CAUGHT_UP_LUA = """
local function caught_up(stream, group)
  if redis.call('EXISTS', stream) == 0 then return true end
  local info = redis.call('XINFO', 'STREAM', stream)
  local last = nil
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then last = info[j + 1] end
  end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
    if f['name'] == group then
      return f['pending'] == 0 and f['last-delivered-id'] == last
    end
  end
  return redis.call('XLEN', stream) == 0
end
"""


@dataclass(frozen=True)
class Backlog:
    """Entries of one stream not yet published: never read (lag) or read, unacked."""

    key: str
    lag: int
    pending: int


def stream_backlog(r: redis.Redis, key: str) -> tuple[int, int]:
    """(lag, pending) of one stream: entries never read, and read but unacknowledged."""
    meta = meta_of(key)
    with r.pipeline(transaction=False) as pipe:
        pipe.exists(key)
        pipe.hmget(meta, [APPENDED_FIELD, DONE_FIELD])
        pipe.xlen(key)
        exists, counts, length = pipe.execute()
    if not exists:
        return 0, 0
    groups = cast(list[dict[str, object]], r.xinfo_groups(key))
    group = next((g for g in groups if g["name"] in (CONSUMER_GROUP, CONSUMER_GROUP.encode())),
                 None)
    if group is None:  # the pool never ran: every entry waits
        return int(length), 0
    pending = int(cast(int, group["pending"]))
    last_read = _text(group["last-delivered-id"])
    info = cast(dict[str, object], r.xinfo_stream(key))
    if last_read == _text(info["last-generated-id"]):
        return 0, pending  # read up to the newest entry: nothing unread, whatever counters say
    appended, done = (int(c) if c is not None else None for c in counts)
    if appended is None or done is None:  # written by a version without counters
        lag = len(cast(list[object], r.xrange(key, min=f"({last_read}")))
        return lag, pending
    # Something is unread (ids after last_read), but never more than the stream holds.
    return min(max(appended - done - pending, 1), int(length)), pending


def backlogs(r: redis.Redis, keys: Keys) -> list[Backlog]:
    """The backlog of every shard stream under the prefix (any shard count)."""
    out = []
    for key in sorted(k.decode() for k in r.scan_iter(match=keys.stream_pattern, count=1000)):
        lag, pending = stream_backlog(r, key)
        out.append(Backlog(key, lag, pending))
    return out


@dataclass(frozen=True)
class Misread:
    """A stream whose waiting entries a pool of ``shards`` would never publish as written."""

    backlog: Backlog
    shard: int
    written_for: int | None  # the shard count its producers recorded in its meta (None: none)


def misread(r: redis.Redis, keys: Keys, shards: int) -> list[Misread]:
    """Streams where entries wait (unread or pending) that a pool of ``shards`` misreads.

    Such a stream was written for another shard count (its meta) or lies beyond the pool's
    shards: its entries would never be published, or published by the wrong shard. The pool
    refuses to start over them (shard/streams.py) and `scalepub status` names them.
    """
    out = []
    for backlog in backlogs(r, keys):
        if not (backlog.lag or backlog.pending):
            continue
        shard = shard_of(keys, backlog.key)
        raw = r.hget(keys.meta(shard), "shards")
        count = int(cast(bytes, raw)) if raw is not None else None
        if count not in (None, shards) or shard >= shards:
            out.append(Misread(backlog, shard, count))
    return out


def shard_of(keys: Keys, stream_key: str) -> int:
    """The shard number in ``{prefix}:{N}:stream``."""
    return int(stream_key[len(keys.prefix) + 2:].split("}", 1)[0])


def meta_of(stream_key: str) -> str:
    """``{prefix}:{N}:meta`` of ``{prefix}:{N}:stream`` (same hash tag): the counters' hash."""
    return stream_key[:-len("stream")] + "meta"


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
