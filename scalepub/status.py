"""`scalepub status`: each shard's backlog and liveness, from Redis alone (a health probe)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import redis

from scalepub.backlog import Misread, misread, stream_backlog
from scalepub.connections import TRANSIENT_ERRORS, check_mode, master_of
from scalepub.settings import Settings
from scalepub.sharding import Keys

# A shard with work waiting and no confirmed publish for this long is stuck.
STUCK_AFTER_S = 30.0
# A relay's report older than this is stale (the relay may write its own ``ttl_s``): no relay
# has looked at that outbox since, so its figures are not current.
RELAY_REPORT_TTL_S = 15.0


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
    problem: str = ""  # what keeps the shard from publishing, as its process reports it
    owner: str | None = None  # the supervisor holding the shard's lease (None: nobody)
    token: int | None = None  # its fencing token
    lease_age_s: float | None = None  # since the owner took the lease
    master: str | None = None  # on a Redis Cluster: host:port of the master of its slot
    reachable: bool = True  # False: its Redis (master) did not answer; ``problem`` says why
    mismatch: bool = False  # entries wait that were written for another shard count

    @property
    def stuck(self) -> bool:
        """Work waits but nothing was confirmed for STUCK_AFTER_S."""
        waiting = self.lag + self.pending > 0
        age = self.last_publish_age_s
        return self.alive and waiting and (age is None or age > STUCK_AFTER_S)

    @property
    def state(self) -> str:
        """ok, stuck, dead, mismatch (entries written for another shard count wait: never
        published as they are), or unreachable (its Redis did not answer: nothing known)."""
        if not self.reachable:
            return "unreachable"
        if self.mismatch:
            return "mismatch"
        if not self.alive:
            return "dead"
        return "stuck" if self.stuck else "ok"


def collect(settings: Settings, client: redis.Redis) -> list[ShardStatus]:
    """The status of shards 0..SHARDS-1 (the count the pool recorded, if any)."""
    check_mode(settings, client)  # a single-node URL at a cluster node: say so, not MOVED
    keys = Keys(settings.key_prefix)
    try:
        recorded = client.get(keys.shard_count)
        now_ms = _redis_ms(client)
    except TRANSIENT_ERRORS:  # e.g. a cluster master failing over: say so per shard below
        recorded, now_ms = None, int(time.time() * 1000)
    shards = int(recorded) if recorded else settings.shards
    now = time.time()
    statuses = [_one_or_unreachable(client, keys, shard, now, now_ms) for shard in range(shards)]
    try:
        found = misread(client, keys, shards)
    except TRANSIENT_ERRORS:  # the shards' own rows already say which Redis is away
        return statuses
    by = f"the pool runs with {shards}" if recorded else f"SHARDS is {shards} (no pool ran yet)"
    for bad in found:
        mine = statuses[bad.shard] if bad.shard < shards else _one(client, keys, bad.shard, now,
                                                                    now_ms)
        flagged = replace(mine, mismatch=True, problem="; ".join(
            filter(None, [_mismatch(bad, by), mine.problem])))
        if bad.shard < shards:
            statuses[bad.shard] = flagged
        else:
            statuses.append(flagged)
    return statuses


def _mismatch(bad: Misread, by: str) -> str:
    written = (f"written for {bad.written_for} shards" if bad.written_for is not None
               else "written for another shard count")
    return (f"shard count mismatch: {bad.backlog.lag + bad.backlog.pending} entries {written} "
            f"wait here, {by}: they are not published until producers and pool use the same "
            "SHARDS")


def _one_or_unreachable(client: redis.Redis, keys: Keys, shard: int, now: float,
                        now_ms: int) -> ShardStatus:
    """The shard's status, or what its Redis answered instead (a cluster master that is down
    or failing over holds up only its own shards)."""
    try:
        return _one(client, keys, shard, now, now_ms)
    except TRANSIENT_ERRORS as exc:
        return ShardStatus(
            shard=shard, length=0, lag=0, pending=0, dead_letters=0, alive=False, pid=None,
            host=None, last_publish_age_s=None, rate=0.0, reachable=False,
            problem=f"redis: {type(exc).__name__}: {exc}"[:200],
            master=master_of(client, keys.stream(shard)))


def _redis_ms(client: redis.Redis) -> int:
    """Redis's clock in ms: lease times are Redis's, so hosts' clocks do not matter."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _lease(client: redis.Redis, keys: Keys, shard: int, now_ms: int) -> dict[str, Any]:
    fence, since = cast(list[bytes | None], client.hmget(keys.lease(shard), ["fence", "since"]))
    if fence is None:
        return {}
    token, _, owner = fence.decode().partition(":")
    age = round((now_ms - int(since)) / 1000, 1) if since is not None else None
    return {"owner": owner, "token": int(token), "lease_age_s": age}


def _one(client: redis.Redis, keys: Keys, shard: int, now: float, now_ms: int) -> ShardStatus:
    lag, pending = stream_backlog(client, keys.stream(shard))
    raw = cast(dict[bytes, bytes], client.hgetall(keys.heartbeat(shard)))
    beat = {k.decode(): v.decode() for k, v in raw.items()}
    last = float(beat.get("last_publish", 0) or 0)
    return ShardStatus(
        shard=shard, length=int(client.xlen(keys.stream(shard))), lag=lag, pending=pending,
        dead_letters=int(client.xlen(keys.dead(shard))), alive=bool(beat),
        pid=int(beat["pid"]) if "pid" in beat else None, host=beat.get("host"),
        last_publish_age_s=round(now - last, 1) if last else None,
        rate=float(beat.get("rate", 0.0)), problem=beat.get("problem", ""),
        **_lease(client, keys, shard, now_ms), master=master_of(client, keys.stream(shard)),
    )


@dataclass(frozen=True)
class SupervisorStatus:
    """A live `scalepub run` supervisor and the shards it works (its share of the spread)."""

    name: str
    host: str | None
    pid: int | None
    shards: list[int] = field(default_factory=list)
    up_s: float | None = None  # since it started (its own clock)


def collect_supervisors(settings: Settings, client: redis.Redis) -> list[SupervisorStatus]:
    """The supervisors whose membership entry has not expired."""
    keys = Keys(settings.key_prefix)
    found = cast(list[bytes], client.zrangebyscore(keys.supervisors, _redis_ms(client), "+inf"))
    live = [m.decode() for m in found]
    if not live:
        return []
    infos = cast(list[bytes | None], client.hmget(keys.supervisor_info, live))
    out = []
    for name, raw in zip(live, infos, strict=True):
        info: dict[str, Any] = json.loads(raw) if raw else {}
        started = info.get("started")
        out.append(SupervisorStatus(
            name=name, host=info.get("host"), pid=info.get("pid"),
            shards=list(info.get("shards", [])),
            up_s=round(time.time() - float(started), 1) if started else None))
    return sorted(out, key=lambda s: s.name)


@dataclass(frozen=True)
class RelayStatus:
    """The outbox backlog of one database, as its relay last reported it."""

    database: str
    rows: int  # entries waiting in the outbox table
    oldest_age_s: float  # age of the oldest of them (0: empty)
    refusing: bool  # Redis refused entries (backpressure or shard count) at the last report
    pid: int | None
    host: str | None
    report_age_s: float
    refused_reason: str = ""  # why Redis refused (a Refusal value), when the relay says
    stale: bool = False  # the report is older than its TTL: not current

    @property
    def state(self) -> str:
        """stale (no current report), behind (oldest waiting entry older than STUCK_AFTER_S)
        or ok."""
        if self.stale:
            return "stale"
        return "behind" if self.oldest_age_s > STUCK_AFTER_S else "ok"

    @property
    def healthy(self) -> bool:
        """Not behind, and not a stale report of rows that may still wait."""
        return self.state == "ok" or (self.state == "stale" and not self.rows)


def collect_relays(settings: Settings, client: redis.Redis) -> list[RelayStatus]:
    """Every outbox relay report still kept in Redis; one older than its TTL is ``stale``."""
    keys = Keys(settings.key_prefix)
    out = []
    now = time.time()
    for key in sorted(client.scan_iter(match=keys.relay_state_pattern, count=1000)):
        raw = cast(dict[bytes, bytes], client.hgetall(key))
        if not raw:
            continue
        state = {k.decode(): v.decode() for k, v in raw.items()}
        out.append(_relay(key.decode()[len(keys.relay_lease("")):-len(":state")], state, now))
    return out


def _relay(name: str, state: dict[str, str], now: float) -> RelayStatus:
    age = round(now - float(state.get("at", now)), 1)
    return RelayStatus(
        database=name, rows=int(state.get("rows", 0)),
        oldest_age_s=float(state.get("oldest_age_s", 0)),
        refusing=state.get("refusing") == "1",
        pid=int(state["pid"]) if "pid" in state else None, host=state.get("host"),
        report_age_s=age, refused_reason=state.get("refused_reason", ""),
        stale=age > float(state.get("ttl_s", RELAY_REPORT_TTL_S)),
    )


def healthy(statuses: Sequence[ShardStatus], relays: Sequence[RelayStatus] = ()) -> bool:
    """Every shard alive and none stuck; no outbox behind."""
    return all(s.state == "ok" for s in statuses) and all(r.healthy for r in relays)


def as_json(statuses: Sequence[ShardStatus], relays: Sequence[RelayStatus] = (),
            supervisors: Sequence[SupervisorStatus] = ()) -> dict[str, list[dict[str, object]]]:
    """The `--json` document: shards, relays and live supervisors."""
    return {"shards": [{**asdict(s), "state": s.state} for s in statuses],
            "relays": [{**asdict(r), "state": r.state} for r in relays],
            "supervisors": [asdict(s) for s in supervisors]}


def table(statuses: list[ShardStatus]) -> str:
    """A terminal table."""
    head = (f"{'shard':>5} {'state':>8} {'length':>9} {'lag':>8} {'pending':>8} "
            f"{'dead':>6} {'rate/s':>9} {'last publish':>13}  process  owner (token, lease age)")
    rows = [head]
    for s in statuses:
        age = "never" if s.last_publish_age_s is None else f"{s.last_publish_age_s:.1f} s ago"
        proc = f"{s.pid}@{s.host}" if s.alive else "-"
        problem = f"  problem: {s.problem}" if s.problem else ""
        owner = f"  {s.owner} ({s.token}, {s.lease_age_s} s)" if s.owner else "  no owner"
        master = f"  master {s.master}" if s.master else ""
        rows.append(f"{s.shard:>5} {s.state:>8} {s.length:>9} {s.lag:>8} {s.pending:>8} "
                    f"{s.dead_letters:>6} {s.rate:>9.0f} {age:>13}  {proc}{owner}{master}"
                    f"{problem}")
    return "\n".join(rows)


def supervisor_lines(supervisors: Sequence[SupervisorStatus]) -> str:
    """One line per live supervisor, for the terminal."""
    if not supervisors:
        return "supervisors: none live"
    return "\n".join(
        f"supervisor {s.name}: {s.pid}@{s.host}, shards {s.shards}"
        f"{f', up {s.up_s:.0f} s' if s.up_s is not None else ''}" for s in supervisors)


def relay_lines(relays: list[RelayStatus]) -> str:
    """One line per outbox relay, for the terminal."""
    return "\n".join(
        f"outbox {r.database}: {r.state}, {r.rows} entries waiting, oldest {r.oldest_age_s:.1f} s"
        f"{_refusing(r)}; relay {r.pid}@{r.host}, reported {r.report_age_s:.0f} s ago"
        f"{' (stale: no relay has reported since)' if r.stale else ''}"
        for r in relays
    )


def _refusing(r: RelayStatus) -> str:
    if not r.refusing:
        return ""
    return f", Redis refusing ({r.refused_reason})" if r.refused_reason else ", Redis refusing"
