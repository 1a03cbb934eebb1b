"""`scalepub status`: each shard's backlog and liveness, from Redis alone (a health probe)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import cast

import redis

from scalepub.settings import Settings
from scalepub.shard.streams import stream_backlog
from scalepub.sharding import Keys

# A shard with work waiting and no confirmed publish for this long is stuck.
STUCK_AFTER_S = 30.0


@dataclass(frozen=True)
class ShardStatus:
    """What `scalepub status` shows for one shard."""

    shard: int
    length: int  # entries in the stream (published ones stay until MAXLEN trims them)
    lag: int  # never read
    pending: int  # read, not yet acknowledged
    dead_letters: int
    alive: bool  # its heartbeat key exists
    pid: int | None
    host: str | None
    last_publish_age_s: float | None  # None: never published since it started
    rate: float  # entries/s over the last heartbeat interval

    @property
    def stuck(self) -> bool:
        """Work waits but nothing was confirmed for STUCK_AFTER_S."""
        waiting = self.lag + self.pending > 0
        age = self.last_publish_age_s
        return self.alive and waiting and (age is None or age > STUCK_AFTER_S)

    @property
    def state(self) -> str:
        """ok, stuck or dead."""
        if not self.alive:
            return "dead"
        return "stuck" if self.stuck else "ok"


def collect(settings: Settings, client: redis.Redis) -> list[ShardStatus]:
    """The status of shards 0..SHARDS-1 (the count the pool recorded, if any)."""
    keys = Keys(settings.key_prefix)
    recorded = client.get(keys.shard_count)
    shards = int(recorded) if recorded else settings.shards
    return [_one(client, keys, shard, time.time()) for shard in range(shards)]


def _one(client: redis.Redis, keys: Keys, shard: int, now: float) -> ShardStatus:
    lag, pending = stream_backlog(client, keys.stream(shard))
    raw = cast(dict[bytes, bytes], client.hgetall(keys.heartbeat(shard)))
    beat = {k.decode(): v.decode() for k, v in raw.items()}
    last = float(beat.get("last_publish", 0) or 0)
    return ShardStatus(
        shard=shard, length=int(client.xlen(keys.stream(shard))), lag=lag, pending=pending,
        dead_letters=int(client.xlen(keys.dead(shard))), alive=bool(beat),
        pid=int(beat["pid"]) if "pid" in beat else None, host=beat.get("host"),
        last_publish_age_s=round(now - last, 1) if last else None,
        rate=float(beat.get("rate", 0.0)),
    )


def healthy(statuses: list[ShardStatus]) -> bool:
    """Every shard alive and none stuck."""
    return all(s.state == "ok" for s in statuses)


def as_json(statuses: list[ShardStatus]) -> list[dict[str, object]]:
    """Rows for `--json`."""
    return [{**asdict(s), "state": s.state} for s in statuses]


def table(statuses: list[ShardStatus]) -> str:
    """A terminal table."""
    head = (f"{'shard':>5} {'state':>6} {'length':>9} {'lag':>8} {'pending':>8} "
            f"{'dead':>6} {'rate/s':>9} {'last publish':>13}  process")
    rows = [head]
    for s in statuses:
        age = "never" if s.last_publish_age_s is None else f"{s.last_publish_age_s:.1f} s ago"
        proc = f"{s.pid}@{s.host}" if s.alive else "-"
        rows.append(f"{s.shard:>5} {s.state:>6} {s.length:>9} {s.lag:>8} {s.pending:>8} "
                    f"{s.dead_letters:>6} {s.rate:>9.0f} {age:>13}  {proc}")
    return "\n".join(rows)
