"""How far the pool is behind on each shard stream: entries never read (lag) and read but not
yet acknowledged (pending). Read by ``scalepub status``, the pool's gauges and its start-up
check; never imports the pool itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis

from scalepub.sharding import CONSUMER_GROUP, Keys


@dataclass(frozen=True)
class Backlog:
    """Entries of one stream not yet published: never read (lag) or read, unacked."""

    key: str
    lag: int
    pending: int


def stream_backlog(r: redis.Redis, key: str) -> tuple[int, int]:
    """(lag, pending) of one stream: entries never read, and read but unacknowledged."""
    groups = cast(list[dict[str, object]], r.xinfo_groups(key)) if r.exists(key) else []
    group = next((g for g in groups if g["name"] in (CONSUMER_GROUP, CONSUMER_GROUP.encode())),
                 None)
    if group is None:
        return int(r.xlen(key)), 0
    lag = group.get("lag")
    if lag is None:  # Redis cannot tell after trims/deletes: count from the last read id
        last = group["last-delivered-id"]
        start = last.decode() if isinstance(last, bytes) else str(last)
        lag = len(cast(list[object], r.xrange(key, min=f"({start}")))
    return int(cast(int, lag)), int(cast(int, group["pending"]))


def backlogs(r: redis.Redis, keys: Keys) -> list[Backlog]:
    """The backlog of every shard stream under the prefix (any shard count)."""
    out = []
    for key in sorted(k.decode() for k in r.scan_iter(match=keys.stream_pattern, count=1000)):
        lag, pending = stream_backlog(r, key)
        out.append(Backlog(key, lag, pending))
    return out
